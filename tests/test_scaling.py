"""`muonlab scaling`: the efficiency measurement at several model sizes, cached and resumable."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from muonlab.cli import main

from muonlab.lab.compare import bracketed
from muonlab.lab.scaling import parameter_counts, scaling, steps_for
from muonlab.lab.train import TrainConfig


def test_steps_and_counts():
    total, non_emb = parameter_counts("tiny")
    assert (total, non_emb) == (227808, 203232)
    assert steps_for(non_emb, 4.0, 16, 128, 100) == 397  # ceil(4 * 203232 / 2048)
    assert steps_for(1000, 4.0, 16, 128, 100) == 100


def test_bracketed():
    assert bracketed({1e-3: 2.0, 2e-3: 1.5, 4e-3: 1.8}) == (True, 0)
    assert bracketed({1e-3: 1.0, 2e-3: 1.5, 4e-3: 1.8}) == (False, -1)
    assert bracketed({1e-3: 2.0, 2e-3: 1.5, 4e-3: 1.2}) == (False, 1)


def test_scaling_small_budget_writes_and_resumes(tmp_path):
    """Two sizes on a tiny budget: scaling.json/csv/png written, rows ordered by size, and a second
    call reuses every cached run (no new training) and gives the same numbers."""
    base = TrainConfig(batch_size=4, seq_len=32, max_corpus_bytes=100000, eval_batches=1)
    logs: list[str] = []
    kw = dict(base=base, tokens_per_param=0.002, min_steps=6, fractions=(0.5, 1.0), sweep=False,
              seeds_ends=(0,), out=tmp_path / "s", progress=False, log=logs.append)
    res = scaling(["mini", "tiny"], **kw)
    assert [r["model"] for r in res["sizes"]] == ["tiny", "mini"]
    assert res["sizes"][0]["steps"] == 6 and res["sizes"][1]["steps"] == 9  # ceil(0.002 * 553856 / 128)
    for name in ("scaling.json", "scaling.csv", "scaling.png"):
        assert (tmp_path / "s" / name).stat().st_size > 0
    assert json.loads((tmp_path / "s" / "scaling.json").read_text())["sizes"] == res["sizes"]
    runs = sorted((tmp_path / "s").rglob("result.json"))
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    again = scaling(["mini", "tiny"], **kw)
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps  # nothing retrained
    assert [r["token_speedup"] for r in again["sizes"]] == [r["token_speedup"] for r in res["sizes"]]

    # the report page, drawn from scaling.json alone (by the study, and again by `muonlab report`)
    page = (tmp_path / "s" / "report.html").read_text()
    table = page[page.index('<table id="scaling"'):page.index("</table>")]
    assert table.count("<tr>") == 3 and "<td>tiny</td>" in table and "<td>mini</td>" in table
    assert "203,232" in table and "553,856" in table
    (tmp_path / "s" / "report.html").unlink()
    (tmp_path / "s" / "scaling.png").unlink()
    assert main(["report", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "report.html").read_text() == page
    assert (tmp_path / "s" / "scaling.png").stat().st_size > 5000
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Debian's chromium is required for this test (scripts/setup.sh --dev installs it)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000", "--dump-dom"]
    dom = subprocess.run([browser, *flags, (tmp_path / "s" / "report.html").as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-plots-rendered="1"' in dom.stdout


def test_report_of_a_damaged_scaling_json_is_named(tmp_path, capsys):
    (tmp_path / "scaling.json").write_text('{"sizes": []}')
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a `muonlab scaling` result (no sizes)" in capsys.readouterr().err


def test_scaling_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model size 'huge'"):
        scaling(["tiny", "huge"], out=tmp_path / "x")
    with pytest.raises(ValueError, match=r"tokens_per_param must be a positive number, got 0"):
        scaling(["tiny"], tokens_per_param=0, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_scaling_bad_flags_in_one_line(tmp_path):
    import subprocess
    import sys

    for args, msg in ((["--steps", "10"], "scaling sets each size's steps from --tokens-per-param; drop --steps/--tokens"),
                      (["--tokens-per-param", "-1"], "--tokens-per-param must be a positive number, got -1.0"),
                      (["--sizes", "tiny,huge"], "unknown model size 'huge'")):
        bad = subprocess.run([sys.executable, "-m", "muonlab", "scaling", *args, "--out", str(tmp_path / "b")],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.startswith(f"muonlab scaling: error: {msg}"), bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_scaling_with_bpe(tmp_path):
    """`muonlab scaling --tokenizer bpe:300` end to end on a tiny budget (about a minute on 2 cores:
    the interleaved step timing of every size)."""
    import subprocess
    import sys

    data = tmp_path / "text.txt"
    data.write_text("".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(3000)))
    common = ["--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--data", str(data), "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "muonlab", "scaling", "--sizes", "tiny,mini", "--tokens-per-param",
                           "0.001", "--min-steps", "4", "--fractions", "0.5,1.0", "--no-sweep", "--seeds-ends", "0",
                           "--tokenizer", "bpe:300", "--out", str(tmp_path / "s"), *common],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "s" / "scaling.json").read_text())
    assert [r["model"] for r in res["sizes"]] == ["tiny", "mini"] and res["config"]["tokenizer"] == "bpe:300"
    assert "token speed-up" in proc.stdout


def test_scaling_widens_the_grid_until_both_optima_are_inside(tmp_path, monkeypatch):
    """The baseline's optimum inside but the optimizer's (full budget) at the low end: the grid gets
    one more point below, shared by both, and the study stops once both are inside."""
    from muonlab.lab import scaling as scaling_mod

    calls: list[tuple[float, ...]] = []

    def fake_efficiency(optimizer, baseline, *, lr_multipliers, out, **kw):
        calls.append(tuple(lr_multipliers))
        lrs = [0.02 * m for m in lr_multipliers]
        base_sweep = {lr: (lr - 0.02) ** 2 for lr in lrs}  # best at the default: inside
        best_opt = 0.005  # the optimizer wants 0.25x: at the low end until the grid reaches 0.125x
        opt_sweep = {lr: (lr - best_opt) ** 2 for lr in lrs}
        full = {"fraction": 1.0, "best_lr": min(opt_sweep, key=opt_sweep.get), "sweep": opt_sweep}
        (b_in, b_edge), (o_in, o_edge) = bracketed(base_sweep), bracketed(opt_sweep)  # as efficiency reports them
        return {"baseline_result": {"sweep": base_sweep, "best_lr": 0.02, "final_val_loss": 2.0, "tokens": 100},
                "points": [full], "token_speedup": 1.5, "time_speedup": 1.4, "per_seed_token_ratio": {0: 0.67},
                "baseline_lr_bracketed": b_in, "baseline_lr_edge": b_edge, "optimizer_lr_bracketed": o_in,
                "optimizer_lr_edge": o_edge, "optimizer_full_budget_lr": full["best_lr"]}

    monkeypatch.setattr(scaling_mod, "efficiency", fake_efficiency)
    res = scaling(["tiny"], base=TrainConfig(max_corpus_bytes=100000), tokens_per_param=0.001, min_steps=2,
                  seeds_ends=(0,), out=tmp_path / "s", progress=False, log=lambda s: None)
    assert calls == [(0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 2.0), (0.125, 0.25, 0.5, 1.0, 2.0)]
    row = res["sizes"][0]
    assert row["baseline_lr_bracketed"] and row["optimizer_lr_bracketed"]
    assert row["optimizer_best_lr_full_budget"] == pytest.approx(0.005)
