"""`muonlab scaling`: the efficiency measurement at several model sizes, cached and resumable."""

from __future__ import annotations

import json

import pytest

from muonlab.lab.scaling import bracketed, parameter_counts, scaling, steps_for
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


def test_scaling_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model size 'huge'"):
        scaling(["tiny", "huge"], out=tmp_path / "x")
    with pytest.raises(ValueError, match=r"tokens_per_param must be a positive number, got 0"):
        scaling(["tiny"], tokens_per_param=0, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
