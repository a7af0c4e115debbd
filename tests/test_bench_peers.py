"""benchmarks/bench_peers.py's equal-precision mode: under ``fp32_iteration`` a peer's Newton-Schulz
really iterates in fp32 (its update matches an fp32 computation of the same polynomial and leaves the
bf16 one), and everything patched is restored afterwards, also when the step raises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_peers  # noqa: E402

from muonlab.coefficients import KELLER  # noqa: E402
from muonlab.reference import torch_ns_fp32  # noqa: E402


def _update(build, G: torch.Tensor, ctx) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros_like(G))
    p.grad = G.clone()
    opt = build([p])
    with ctx():
        opt.step()
    return p.detach().clone()


def _direction_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative distance of a's direction from b's (free of each library's lr scaling)."""
    a, b = a.double().flatten(), b.double().flatten()
    alpha = float(a @ b) / float(a @ a)
    return float((alpha * a - b).norm() / b.norm())


@pytest.mark.parametrize("peer", ["torch", "pytorch_optimizer"])
def test_fp32_iteration_makes_the_peer_iterate_in_fp32_and_restores_it(peer):
    G = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    want = torch_ns_fp32(G, KELLER, 5, 1e-7)  # Keller's quintic x5 in fp32 (both peers' default)
    if peer == "torch":
        import torch.optim._muon as mod

        build = lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0, nesterov=False)  # noqa: E731
        attrs = [(mod, "_zeropower_via_newtonschulz")]
    else:
        import pytorch_optimizer as po
        import pytorch_optimizer.optimizer.muon.base as mod

        build = lambda ps: po.Muon([dict(params=ps, use_muon=True)], lr=0.02, nesterov=False)  # noqa: E731
        attrs = [(mod, "zero_power_via_newton_schulz_5"), (mod, "zero_power_via_gram_newton_schulz")]
    before = [getattr(m, a) for m, a in attrs]
    patched = _update(build, G, bench_peers.fp32_iteration(peer))
    shipped = _update(build, G, bench_peers.contextlib.nullcontext)
    assert _direction_gap(patched, want) < 1e-5, "the patched peer does not iterate in fp32"
    assert _direction_gap(shipped, want) > 1e-4, "the shipped peer was expected to iterate in bf16"
    assert [getattr(m, a) for m, a in attrs] == before
    with pytest.raises(RuntimeError, match="boom"):
        with bench_peers.fp32_iteration(peer)():
            raise RuntimeError("boom")
    assert [getattr(m, a) for m, a in attrs] == before


def test_unknown_peer_is_refused():
    with pytest.raises(ValueError, match="unknown peer 'nope'"):
        bench_peers.fp32_iteration("nope")
