"""compare -> summary files -> plots -> HTML report, checked in a real headless Chromium."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess

import pytest

from muonlab.cli import main
from muonlab.lab.compare import compare, crossing
from muonlab.lab.data import load_corpus
from muonlab.lab.train import TrainConfig

MICRO = dict(d_model=32, n_layer=1, n_head=2, n_kv_head=1, seq_len=32)


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    text = "".join(f"class C{i}:\n    def m(self, y):\n        return y + {i}\n\n" for i in range(3000))
    (root / "data.py").write_text(text)
    load_corpus(root / "data.py", cache_dir=root / "cache")
    base = TrainConfig(model="tiny", model_overrides=MICRO, steps=16, batch_size=4, eval_every=4, eval_batches=2,
                       checkpoint_every=8, warmup=2, device="cpu", data=str(root / "data.py"))
    out = root / "out"
    kwargs = dict(base=base, sweep=True, lr_multipliers=(0.5, 1.0), seeds=(0, 1), out=out, progress=False,
                  log=lambda s: None)
    summary = compare(["muon", "adamw"], **kwargs)
    return out, summary, kwargs


def test_summary_files(compare_dir):
    out, summary, _ = compare_dir
    data = json.loads((out / "summary.json").read_text())
    assert data["baseline"] == "adamw"
    for name in ("muon", "adamw"):
        s = data["optimizers"][name]
        for key in ("final_val_loss", "tokens", "wall_time_s", "best_lr"):
            assert s[key] is not None
        assert s["best_lr"] in [p["lr"] for p in s["sweep"]]
        assert len(s["sweep"]) == 2 and s["seeds"] == 2
        assert s["final_val_loss"] == min(p["final_val_loss"] for p in s["sweep"])
        assert s["tokens"] == 16 * 4 * 32
    # the baseline reaches its own (per-seed) final loss exactly at the end of its budget
    assert data["optimizers"]["adamw"]["speedup_tokens"] == pytest.approx(1.0)
    assert data["optimizers"]["adamw"]["tokens_to_baseline"] == pytest.approx(16 * 4 * 32)
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["optimizer"] for r in rows} == {"muon", "adamw"}
    assert float(rows[0]["final_val_loss"]) == pytest.approx(summary["optimizers"][rows[0]["optimizer"]]["final_val_loss"])
    for png in ("val_loss_vs_tokens", "val_loss_vs_time", "learning_rate", "muon_update_rms", "lr_sweep"):
        assert (out / f"{png}.png").stat().st_size > 5000


def test_second_compare_reuses_cached_runs(compare_dir):
    out, summary, kwargs = compare_dir
    metrics = sorted(out.glob("runs/*/*/metrics.jsonl"))
    assert len(metrics) == 8  # 2 optimizers x 2 lrs x 2 seeds
    stamps = {p: p.stat().st_mtime_ns for p in metrics}
    again = compare(["muon", "adamw"], **{**kwargs, "report": False})
    assert {p: p.stat().st_mtime_ns for p in metrics} == stamps  # nothing retrained
    assert again["optimizers"]["muon"]["final_val_loss"] == summary["optimizers"]["muon"]["final_val_loss"]


def test_report_redraws_from_files(compare_dir, tmp_path):
    out, _, _ = compare_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.png", "report.html", "checkpoint.pt"))
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").exists() and (copy / "val_loss_vs_tokens.png").exists()


def test_report_of_a_wrong_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "summary.json" in capsys.readouterr().err


def test_crossing_interpolates():
    rows = [{"kind": "eval", "val_loss": 3.0, "tokens": 0}, {"kind": "eval", "val_loss": 2.0, "tokens": 100}]
    assert crossing(rows, 2.5, "tokens") == pytest.approx(50)
    assert crossing(rows, 1.0, "tokens") is None


def test_unknown_optimizer_lists_valid_ones(capsys):
    assert main(["compare", "--optimizers", "muon,adamz", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "adamz" in err and "adamw" in err and "lion" in err


def test_report_renders_in_headless_chromium(compare_dir, tmp_path):
    out, _, _ = compare_dir
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Debian's chromium is required for this test (scripts/setup.sh --dev installs it)"
    report = out / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    n_imgs = len(re.findall(r'<img class="plot"', html))
    assert n_imgs >= 4
    m = re.search(r'data-plots-rendered="(\d+)"', html)
    assert m and int(m.group(1)) == n_imgs, "every plot image must decode and render in the browser"
    table = html[html.index('<table id="summary"'):html.index("</table>")]
    assert "<td>muon</td>" in table and "<td>adamw</td>" in table
    shot = tmp_path / "shot.png"
    res = subprocess.run([browser, *flags, "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.stat().st_size > 20000  # a real rendered page, not a blank one


def test_interleaved_step_timing_runs_the_training_step_every_optimizer_needs(compare_dir):
    # Sophia estimates a Hessian from a second-order graph: the timing loop must run the same
    # forward/backward as train() (it once called plain loss.backward() and crashed after all runs)
    from muonlab.lab.compare import interleaved_step_ms

    _, _, kwargs = compare_dir
    ms = interleaved_step_ms(["sophia", "muon", "adamw"], kwargs["base"], steps=2, warmup=1)
    assert set(ms) == {"sophia", "muon", "adamw"}
    assert all(v > 0 for v in ms.values()), ms


# --- reliability (issue 13) ---------------------------------------------------------------------


def _hostile_summary() -> dict:
    script = "<script>alert('x')</script>"
    row = {"optimizer": f"muon{script}", "best_lr": 0.02, "final_val_loss": 1.5, "final_val_loss_std": script,
           "seeds": 2, "tokens": script, "tokens_to_baseline": script, "speedup_tokens": script,
           "wall_time_s": 1.0, "time_to_baseline_s": None, "speedup_time": None, "step_ms": 3.0,
           "optimizer_state_bytes": script, "runs": [], "run_seeds": [], "sweep": []}
    return {"baseline": f"adamw{script}", "target_val_loss": script, "optimizers": {"muon": row},
            "config": {"model": f"tiny{script}", "steps": script}, "corpus": {"source": script}}


def test_report_escapes_every_field_of_summary_json(tmp_path, monkeypatch):
    from muonlab.lab import report

    monkeypatch.setattr(report, "draw_plots", lambda out_dir, summary: {})  # this test is about the HTML
    (tmp_path / "summary.json").write_text(json.dumps(_hostile_summary()))
    page = report.write_report(tmp_path).read_text()
    assert page.count("<script>") == 1  # the report's own script, nothing from the data
    assert "alert('x')" not in page  # nowhere unescaped, inside the script tag or out
    assert page.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") >= 8  # shown as text, every field


def test_config_steps_alone_is_escaped(tmp_path, monkeypatch):
    # the field the issue names: config.steps was the one value inserted without html.escape
    from muonlab.lab import report

    monkeypatch.setattr(report, "draw_plots", lambda out_dir, summary: {})
    summary = {"baseline": "adamw", "target_val_loss": 1.6, "optimizers": {},
               "config": {"model": "tiny", "steps": "<script>alert(1)</script>"}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = report.write_report(tmp_path).read_text()
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; steps per run" in page


def test_a_damaged_summary_json_is_named(tmp_path, capsys):
    (tmp_path / "summary.json").write_text('{"baseline": "adamw", "optim')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("muonlab report: error: ")
    assert f"summary file {tmp_path / 'summary.json'} is damaged (not valid JSON" in err
