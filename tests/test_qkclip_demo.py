"""`muonlab qk-clip-demo` (issue 15): two lab runs, with and without QK-Clip, their files and summary."""

from __future__ import annotations

import json
import math

import pytest

from muonlab.cli import main
from muonlab.lab.analysis import qkclip as demo
from muonlab.lab.train import read_metrics

TINY = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--max-corpus-bytes", "100000", "--eval-batches", "1",
        "--warmup", "0", "--probes", "2"]


def test_demo_writes_its_files_and_a_summary_that_matches_the_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    # tau far below the logits of a fresh model: the clipped run clips every head at every step
    assert main(["qk-clip-demo", *TINY, "--tau", "0.05", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "unclipped (qk_clip=inf)" in printed and "clipped (qk_clip=0.05)" in printed
    png, js = out / "qkclip_demo.png", out / "qkclip_demo.json"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(js.read_text())
    assert data["settings"]["tau"] == 0.05 and data["settings"]["steps"] == 3
    assert data["settings"]["schedule"] == "constant" and "before" in data["semantics"]

    runs = data["runs"]
    for name in ("unclipped", "clipped"):
        run = runs[name]
        folder = out / run["folder"]
        assert (folder / "result.json").exists() and (folder / "probes.json").exists()
        rows = read_metrics(folder)
        train = [r for r in rows if r["kind"] == "train"]
        evals = [r for r in rows if r["kind"] == "eval"]
        # the series are the trainer's metrics.jsonl, unchanged
        assert run["series"]["step"] == [1, 2, 3]
        assert run["series"]["max_attn_logit"] == [r["max_attn_logit"] for r in train]
        assert run["series"]["loss"] == [r["loss"] for r in train]
        assert run["eval"]["val_loss"] == [r["val_loss"] for r in evals]
        s = run["summary"]
        logits = [r["max_attn_logit"] for r in train]
        assert s["peak_max_attn_logit"] == max(logits)
        assert s["steps_over_tau"] == sum(v > 0.05 for v in logits) == 3
        assert s["final_val_loss"] == evals[-1]["val_loss"] == json.loads((folder / "result.json").read_text())[
            "final_val_loss"]
        assert s["final_loss"] == train[-1]["loss"]
        assert s["clipped_head_steps"] == sum(r["qk_clipped_heads"] for r in train)
        assert s["total_heads"] == 8 and s["final_weights_val_max_logit"] > 0
        # probes at steps 2 and 3 (of 3): the logged value of that step and of the next
        assert [p["step"] for p in run["probes"]] == [2, 3]
        assert [p["logged_before"] for p in run["probes"]] == logits[1:]
        assert [p["next_logged"] for p in run["probes"]] == [logits[2], None]
        assert all(p["after_clip_same_batch"] > 0 for p in run["probes"])
    # same seed, data and initialisation: the first forward pass is the same in both runs
    u, c = runs["unclipped"], runs["clipped"]
    assert u["series"]["max_attn_logit"][0] == c["series"]["max_attn_logit"][0]
    assert u["series"]["loss"][0] == c["series"]["loss"][0]
    assert u["summary"]["clipped_head_steps"] == 0 and u["qk_clip"] == "inf"
    assert c["summary"]["clipped_head_steps"] == 3 * 8 and c["summary"]["min_gamma"] < 1
    top = data["summary"]
    assert top["clipped_peak_max_attn_logit"] == c["summary"]["peak_max_attn_logit"]
    assert top["unclipped_final_val_loss"] == u["summary"]["final_val_loss"]
    assert top["clipped_steps_logged_over_tau"] == 3
    assert top["clipped_probe_after_clip_max"] == max(p["after_clip_same_batch"] for p in c["probes"])

    # run again: both runs and their probes are reused, not retrained
    before = {p: p.read_bytes() for p in out.rglob("*") if p.name in ("metrics.jsonl", "probes.json")}
    assert main(["qk-clip-demo", *TINY, "--tau", "0.05", "--out", str(out), "--quiet"]) == 0
    assert {p: p.read_bytes() for p in before} == before
    assert json.loads(js.read_text())["runs"]["clipped"]["series"] == c["series"]


def test_probe_steps_spread_over_the_run():
    assert demo.probe_steps(150, 4) == [38, 75, 112, 150]
    assert demo.probe_steps(3, 3) == [1, 2, 3]
    assert demo.probe_steps(10, 0) == []
    with pytest.raises(ValueError, match="cannot probe 5 steps of a 3-step run"):
        demo.probe_steps(3, 5)


def test_demo_configs_differ_only_in_qk_clip():
    unclipped, clipped = demo.demo_configs(steps=20, tau=30)
    assert math.isinf(unclipped.qk_clip) and clipped.qk_clip == 30.0
    a, b = vars(unclipped).copy(), vars(clipped).copy()
    a.pop("qk_clip"), b.pop("qk_clip")
    assert a == b and a["schedule"] == "constant" and a["lr"] == demo.DEFAULTS["lr"]
    with pytest.raises(ValueError, match="tau must be a positive finite number"):
        demo.demo_configs(tau=math.inf)


@pytest.mark.parametrize("argv, message", [
    (["--tau", "inf"], "--tau must be a positive finite number (the clipped run's threshold), got inf"),
    (["--tau", "0"], "--tau must be a positive finite number (the clipped run's threshold), got 0.0"),
    (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--steps", "3", "--probes", "4"], "--probes must be between 0 and --steps (3), got 4"),
    (["--seq-len", "999"], "--seq-len 999 exceeds the tiny model's context length 128"),
    (["--model", "huge"], "unknown model size 'huge'; valid names: micro, tiny, "),
    (["--optimizer", "nope"], "unknown optimizer 'nope'"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    out = tmp_path / "demo"
    assert main(["qk-clip-demo", "--out", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"muonlab qk-clip-demo: error: {message}") and err.count("\n") == 1
    assert not out.exists()  # nothing trained, no folder
