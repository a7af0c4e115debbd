"""The torch.compile path (``orthogonalize(compile=True)``, ``Muon(compile=True)``) against eager.

Compilation costs seconds per graph on a CPU, so the fast test compiles the few graphs one small
model needs; the slow one covers every polynomial method, tall views and batches.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from muonlab import Muon, orthogonalize


def _model() -> nn.Module:
    torch.manual_seed(0)
    # wide, tall (transposed into the wide bucket) and square matrices; embedding and head on AdamW
    return nn.Sequential(nn.Embedding(32, 24), nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 24), nn.Linear(24, 24), nn.Linear(24, 32))


def _train(compile: bool, steps: int = 3, whole_step: bool = False, **opts) -> list[torch.Tensor]:
    model = _model()
    opt = Muon(model, lr=0.05, adamw_lr=1e-2, compile=compile, **opts)
    # the whole step as one graph: fullgraph=True fails on any graph break
    step = torch.compile(opt.step, fullgraph=True) if whole_step else opt.step
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 32, (4, 6), generator=gen)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        step()
    return [p.detach().clone() for p in model.parameters()]


def test_the_whole_step_compiles_as_one_graph_and_matches_eager() -> None:
    """torch.compile(opt.step, fullgraph=True): no graph break anywhere in the step (Muon and the fused
    AdamW part) when the gradient check is off, the check being a host decision; the result equals the
    eager step, and later steps reuse the graph instead of recompiling."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _train(False, steps=4, nonfinite="propagate", fused=True)
    compiled = _train(False, steps=4, whole_step=True, nonfinite="propagate", fused=True)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=2e-5)
    assert not counters["graph_break"]
    # the first step (state created) and the second (state present) trace; the rest hit the cache
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_compiled_muon_matches_eager_muon() -> None:
    eager, compiled = _train(False), _train(True)
    moved = max(float((e - p0).abs().max()) for e, p0 in zip(eager, [p.detach() for p in _model().parameters()]))
    assert moved > 1e-2  # the comparison is about real steps
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-5)


def test_compile_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="compile must be True or False, got 'yes'"):
        Muon(_model(), compile="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compile must be True or False"):
        orthogonalize(torch.randn(4, 4), compile=1)  # type: ignore[arg-type]


def test_compile_survives_deepcopy() -> None:
    import copy

    opt = Muon(_model(), compile=True)
    assert copy.deepcopy(opt).compile is True


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,shape",
    [
        ("newton_schulz", (64, 96)),
        ("newton_schulz", (96, 64)),       # tall: transposed view
        ("newton_schulz", (5, 32, 48)),    # batch
        ("gram", (40, 200)),
        ("gram", (3, 200, 40)),
        ("inverse_sqrt", (3, 16, 16)),
        ("auto", (160, 640)),
    ],
)
def test_compiled_orthogonalize_matches_eager(method: str, shape: tuple[int, ...]) -> None:
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(orthogonalize(G, method, compile=True), orthogonalize(G, method), rtol=0, atol=2e-5)
    # the robustness of the eager path holds in the graph too: a zero matrix maps to zero, not NaN
    Z = torch.zeros(*shape)
    assert torch.equal(orthogonalize(Z, method, compile=True), Z)
