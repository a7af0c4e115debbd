"""Analysis tools (issue 5): optimizer paths, optimizer-state memory, update spectra, their CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from muonlab import Muon
from muonlab.lab.analysis import memory, paths, spectrum
from muonlab.lab.analysis.cli import register


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="muonlab")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


# ------------------------------------------------------------------------------------- spectra


def _muon_update(G: torch.Tensor, **opts) -> torch.Tensor:
    """The step the real Muon optimizer takes for gradient G (lr 1, no momentum, no shape scale)."""
    p = torch.nn.Parameter(torch.zeros_like(G))
    opt = Muon([{"params": [p], "algorithm": "muon"}], lr=1.0, momentum=0.0, nesterov=False,
               adjust_lr_fn="none", normuon=False, **opts)
    p.grad = G.clone()
    opt.step()
    return -p.detach()


def test_muon_update_singular_values_sit_in_keller_band():
    # a well-conditioned matrix (Gaussian, aspect 4: σ_max/σ_min ≈ 3); measured band [0.682, 1.134]
    G = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(_muon_update(G))
    assert 0.66 < float(s.min()) and float(s.max()) < 1.2
    # the spectrum tool's Keller curve is the same orthogonalization
    cap = spectrum.Captured(G, "gaussian")
    by_name = {sp.name: sp for sp in spectrum.update_spectra(cap)}
    keller = by_name["muon-keller"].singular_values
    assert 0.66 < min(keller) and max(keller) < 1.2
    assert torch.allclose(torch.tensor(keller, dtype=torch.float64), s.double(), atol=1e-4)
    # exact msign: all ones; the Polar Express / You schedules are tighter than Keller's
    assert max(abs(v - 1) for v in by_name["msign-svd"].singular_values) < 1e-4
    assert max(abs(v - 1) for v in by_name["muon-you"].singular_values) < 0.05


def test_spectrum_random_lowrank_orthogonalization_lifts_rare_directions():
    cap = spectrum.random_lowrank((128, 48), rank=6, noise=1e-3, seed=1)
    sp = {s.name: s for s in spectrum.update_spectra(cap)}
    raw, keller, sign = sp["raw"], sp["muon-keller"], sp["sign"]
    assert len(raw.singular_values) == 48
    assert all(abs(s.normalized[0] - 1) < 1e-9 for s in sp.values())  # each divided by its own σ_max
    assert raw.median_normalized < 0.05  # the low-rank matrix: rare directions ~100x below the top
    assert keller.median_normalized > 10 * raw.median_normalized
    assert min(keller.normalized) > 0.4  # Keller x5 lifts even the noise directions into its band
    assert keller.stable_rank > 10 * raw.stable_rank
    # sign(G) and AdamW's first step g/(|g|+eps) are the same matrix up to eps
    assert sp["adamw-first"].normalized == pytest.approx(sign.normalized, rel=1e-4, abs=1e-6)
    assert "adamw-state" not in sp  # no AdamW run behind a random matrix
    data = spectrum.to_json(cap, list(sp.values()))
    assert data["shape"] == [128, 48] and "rare" in data["caption"]
    assert {s["name"] for s in data["spectra"]} == set(sp)


def test_spectrum_lab_capture_uses_real_adamw_state(tmp_path):
    cap = spectrum.capture_lab_matrix("blocks.0.mlp.w1.weight", steps=3, batch_size=2, seq_len=32,
                                      max_bytes=20_000, cache_dir=str(tmp_path / "cache"))
    assert tuple(cap.G.shape) == (256, 96) and cap.adamw_direction is not None
    assert len(cap.meta["losses"]) == 3 and all(math.isfinite(v) for v in cap.meta["losses"])
    sp = {s.name: s for s in spectrum.update_spectra(cap)}
    assert "adamw-state" in sp and len(sp["adamw-state"].singular_values) == 96
    assert sp["muon-keller"].median_normalized > 10 * sp["raw"].median_normalized
    with pytest.raises(ValueError, match="unknown parameter"):
        spectrum.capture_lab_matrix("nope", steps=1, max_bytes=20_000, cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------- memory


def test_memory_adamw_is_twice_the_parameters_exactly():
    row = memory.measure_entry("adamw", "tiny")
    summary = memory.model_summary("tiny")
    n, tensors = summary["parameters"], summary["param_tensors"]
    assert row.status == "ok" and row.param_bytes == n * 4
    # exp_avg + exp_avg_sq in fp32, plus one 0-d float32 step counter per parameter tensor
    assert row.state_bytes == 2 * n * 4 + 4 * tensors
    assert row.scalar_bytes == 4 * tensors
    assert row.by_key == {"exp_avg": n * 4, "exp_avg_sq": n * 4, "step": 4 * tensors}
    assert row.expected_x == 2.0 and row.seed_x == "2x"
    assert row.measured_x == pytest.approx(2.0, abs=1e-3)


def test_memory_sgd_without_momentum_holds_nothing():
    row = memory.measure_entry("sgd", "tiny")
    assert row.status == "ok" and row.state_bytes == 0 and row.measured_x == 0.0
    assert memory.measure_entry("sgd-momentum", "tiny").measured_x == 1.0


def test_memory_muon_is_one_x_matrices_plus_two_x_adamw():
    summary = memory.model_summary("tiny")
    m, a, n = summary["muon_matrix_elements"], summary["adamw_elements"], summary["parameters"]
    assert m + a == n and m > 0 and a > 0
    row = memory.measure_entry("muon", "tiny")
    # momentum for every Muon matrix, m and v for the AdamW part, one 0-d step per tensor
    assert row.state_bytes == 4 * (m + 2 * a) + 4 * summary["param_tensors"]
    assert row.by_key["momentum_buffer"] == 4 * m
    assert row.by_key["exp_avg"] == row.by_key["exp_avg_sq"] == 4 * a
    assert row.expected_bytes == 4 * (m + 2 * a)
    assert 1.0 < row.measured_x < 1.2


def test_memory_sophia_step_with_create_graph_works():
    # SophiaH differentiates the gradient again: the memory tool runs that step with the math SDPA
    # kernel (CPU flash attention has no double backward). pytorch-optimizer's SophiaH keeps three
    # buffers (momentum, hessian_moment, hessian), not the 2x of seed 004's table.
    row = memory.measure_entry("sophia", "tiny", batch_size=1, seq_len=16)
    assert row.status == "ok", row.note
    assert row.measured_x == pytest.approx(3.0)


def test_state_bytes_follows_nested_lists_and_counts_shared_storage_once():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = torch.optim.SGD([p], lr=0.1)
    buf = torch.ones(4, 4)
    opt.state[p] = {"a": [buf, torch.zeros(3)], "b": buf, "c": {"d": torch.tensor(1.0)}, "e": 7, "f": p.data}
    total, scalars, by_key = memory.state_bytes(opt, exclude=[p])
    assert total == 16 * 4 + 3 * 4 + 4 and scalars == 4
    assert by_key == {"a": 76, "c": 4}


def test_memory_unbuildable_entry_is_skipped_with_a_note(monkeypatch):
    from muonlab.lab import zoo

    def broken(*args, **kwargs):
        raise ImportError("pytorch-optimizer is not installed")

    monkeypatch.setattr(zoo.ZOO["lion"], "build", broken)
    row = memory.measure_entry("lion", "tiny")
    assert row.status == "skipped" and "not installed" in row.note and row.state_bytes is None
    assert memory.table_rows([row])[0][-1].startswith("not built")


# ------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("function", ["rosenbrock", "quadratic"])
def test_paths_start_at_start_have_steps_plus_one_points(function):
    start = (-1.2, 2.0)
    res = paths.run_paths(["sgd-momentum", "adamw", "muon", "lion", "adam"], function, start=start, steps=200)
    for p in res:
        assert len(p.points) == 201 and len(p.values) == 201
        assert p.points[0] == [start[0], start[1]]
        assert p.diverged_at is None and all(v is not None for v in p.values)
    by = {p.name: p for p in res}
    for name in ("adamw", "muon"):
        assert by[name].values[-1] < 0.5 * by[name].values[0]
    if function == "rosenbrock":
        assert by["muon"].values[-1] < 1.0  # normalized steps ride down the banana valley


def test_muon_step_on_a_vector_is_a_unit_direction_times_lr():
    lr, start = 0.05, (-1.5, 2.5)
    x, y = torch.tensor(start[0], dtype=torch.float64, requires_grad=True), torch.tensor(start[1], dtype=torch.float64,
                                                                                         requires_grad=True)
    paths.rosenbrock(x, y).backward()
    g = torch.stack([x.grad, y.grad])
    unit = -g / g.norm()
    opts = {"momentum": 0.0, "nesterov": False}
    # exact msign: the step is exactly lr along -g/|g|
    p = paths.run_path("muon", "rosenbrock", start=start, steps=1, lr=lr, options={**opts, "ns_method": "svd"})
    step = torch.tensor(p.points[1], dtype=torch.float64) - torch.tensor(start, dtype=torch.float64)
    assert float(step.norm()) == pytest.approx(lr, rel=1e-6)
    assert torch.allclose(step / step.norm(), unit, atol=1e-6)
    # Keller x5 (the default): the same direction, length lr * g(1) with g the composed quintic
    factor = paths.muon_vector_step_factor()
    assert 0.6 < factor < 0.8
    p = paths.run_path("muon", "rosenbrock", start=start, steps=1, lr=lr, options=opts)
    step = torch.tensor(p.points[1], dtype=torch.float64) - torch.tensor(start, dtype=torch.float64)
    assert float(step.norm()) == pytest.approx(lr * factor, rel=1e-5)
    assert torch.allclose(step / step.norm(), unit, atol=1e-5)
    # every step, whatever the gradient's size, has that same length (no momentum)
    p = paths.run_path("muon", "quadratic", start=start, steps=20, lr=lr, options=opts)
    pts = torch.tensor(p.points, dtype=torch.float64)
    lengths = (pts[1:] - pts[:-1]).norm(dim=1)
    assert torch.allclose(lengths, torch.full_like(lengths, lr * factor), rtol=1e-4)


def test_paths_divergence_is_recorded_not_raised():
    p = paths.run_path("sgd", "rosenbrock", steps=30, lr=1.0)
    assert p.diverged_at is not None and len(p.points) == 31
    assert p.points[-1] == [None, None] and p.values[-1] is None


def test_paths_parsing_errors():
    assert paths.parse_lr_overrides("sgd=1e-3, muon=0.05") == {"sgd": 1e-3, "muon": 0.05}
    for bad in ("sgd", "nope=1", "sgd=x", "sgd=-1"):
        with pytest.raises(ValueError):
            paths.parse_lr_overrides(bad)
    assert paths.parse_point("-1.5,2.5") == (-1.5, 2.5)
    with pytest.raises(ValueError, match="X,Y"):
        paths.parse_point("1")
    with pytest.raises(ValueError, match="unknown optimizer"):
        paths.parse_optimizers("sgd,shampoo")
    with pytest.raises(ValueError, match="not in the optimizer list"):
        paths.run_paths(["sgd"], lrs={"muon": 0.1}, steps=1)


# ------------------------------------------------------------------------------------- CLI


def test_cli_paths_writes_png_and_json(tmp_path, capsys):
    out = tmp_path / "p.png"
    assert run_cli("paths", "--steps", "30", "--optimizers", "sgd-momentum,adamw,muon", "--lr", "muon=0.02",
                   "--start=-1,2", "--out", str(out)) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.stat().st_size > 10_000
    assert data["start"] == [-1.0, 2.0] and data["minimum"] == [1.0, 1.0] and data["steps"] == 30
    assert [p["name"] for p in data["paths"]] == ["sgd-momentum", "adamw", "muon"]
    assert data["paths"][2]["lr"] == 0.02 and len(data["paths"][2]["points"]) == 31
    assert "normalized-direction" in data["muon_note"]
    assert "muon" in capsys.readouterr().out
    assert run_cli("paths", "--function", "quadratic", "--steps", "5", "--muon-ns", "svd",
                   "--optimizers", "muon", "--out", str(tmp_path / "q.png")) == 0
    assert (tmp_path / "q.json").stat().st_size > 0


def test_cli_memory_writes_csv_json_png(tmp_path, capsys):
    out = tmp_path / "mem.png"
    assert run_cli("memory", "--model", "tiny", "--optimizers", "sgd,adamw,muon", "--out", str(out), "--quiet") == 0
    text = capsys.readouterr().out
    assert "adamw" in text and "2.000" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["name"] for r in data["rows"]] == ["sgd", "adamw", "muon"]
    assert data["meta"]["parameters"] == data["rows"][0]["param_bytes"] // 4
    csv_text = out.with_suffix(".csv").read_text().splitlines()
    assert csv_text[0].startswith("name,") and len(csv_text) == 4
    assert out.stat().st_size > 10_000


def test_cli_spectrum_random_lowrank_writes_png_and_json(tmp_path):
    out = tmp_path / "spec.png"
    assert run_cli("spectrum", "--random-lowrank", "--shape", "64x32", "--rank", "4", "--out", str(out)) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["shape"] == [64, 32] and data["meta"]["kind"] == "random-lowrank"
    assert "rare" in data["caption"] and len(data["spectra"][0]["singular_values"]) == 32
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
    (["--seq-len", "100000"], "--seq-len 100000 exceeds the tiny model's context length 128"),
])
def test_cli_memory_rejects_impossible_batches(tmp_path, capsys, argv, message):
    # issue 13: --batch-size 0 and --seq-len 100000 were accepted (the latter silently cut to 128)
    from muonlab.cli import main

    out = tmp_path / "mem.png"
    assert main(["memory", "--model", "tiny", "--optimizers", "sgd", "--out", str(out), "--quiet", *argv]) == 2
    assert capsys.readouterr().err == f"muonlab memory: error: {message}\n"
    assert not out.exists()


def test_memory_and_spectrum_functions_refuse_a_sequence_longer_than_the_context(tmp_path):
    with pytest.raises(ValueError, match="sequence length 129 exceeds the tiny model's context length 128"):
        memory.measure_entry("sgd", "tiny", seq_len=129)
    with pytest.raises(ValueError, match="batch size must be a positive integer"):
        memory.measure_all("tiny", ["sgd"], batch_size=0)
    with pytest.raises(ValueError, match="seq_len 129 exceeds the tiny model's context length 128"):
        spectrum.capture_lab_matrix(steps=1, seq_len=129, cache_dir=str(tmp_path))
