"""GPU correctness: every orthogonalization method in bf16 on CUDA against a float64 SVD, the
optimizer step on CUDA against the CPU, torch.compile and CUDA-graph capture of orthogonalize.

Skipped where there is no CUDA device (the only skip in the suite); ``benchmarks/gpu_suite.sh``
runs this file on a GPU machine. The bounds are the CPU bf16 bounds of tests/test_orthogonalize.py
and tests/test_dtype_probe.py with margin: bf16 storage with fp32 accumulation on both devices,
only the summation order differs (measured on CPU: 5e-3..9e-3 for the converging schedules).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from muonlab import METHODS, Muon, orthogonalize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_suite.sh)")

ortho = sys.modules["muonlab.orthogonalize"]
CUDA = torch.device("cuda")


def randn64(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def polar64(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double().cpu(), full_matrices=False)
    return U @ Vh


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


# method -> (keyword arguments that converge, bound on the distance from U Vᵀ in bf16)
CONVERGING = {
    "newton_schulz": (dict(coefficients="polar_express", steps=8), 3e-2),
    "gram": (dict(coefficients="polar_express", steps=8), 3e-2),
    "auto": (dict(coefficients="polar_express", steps=8), 3e-2),
    "inverse_sqrt": (dict(steps=30, eps=0.0), 3e-2),
    "svd": ({}, 1e-4),  # the SVD methods decompose in fp32 whatever dtype says
    "svd_inv_sqrt": ({}, 2e-3),
}
assert set(CONVERGING) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(128, 512), (512, 128), (4, 96, 160), (768, 3072)])
def test_every_method_in_bf16_on_the_gpu_against_fp64_svd(method: str, shape: tuple[int, ...]) -> None:
    kwargs, bound = CONVERGING[method]
    G64 = randn64(*shape, seed=sum(shape))
    out = orthogonalize(G64.float().to(CUDA), method, dtype="bf16", **kwargs)
    assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == G64.shape
    assert torch.isfinite(out).all()
    assert rel(out, polar64(G64)) < bound


@pytest.mark.parametrize("method", ["newton_schulz", "gram", "auto"])
@pytest.mark.parametrize("shape", [(256, 1024), (1024, 256), (3, 128, 384)])
def test_default_keller_in_bf16_on_the_gpu_is_in_the_fp64_band(method: str, shape: tuple[int, ...]) -> None:
    # the optimizer's default (Keller x5, the device's default dtype: bf16 on GPUs with native
    # bf16) against the same polynomial in float64 (bounds as in tests/test_dtype_probe.py)
    G64 = randn64(*shape, seed=7 + sum(shape))
    out = orthogonalize(G64.float().to(CUDA), method)
    exact_poly = orthogonalize(G64, "newton_schulz")
    polar = polar64(G64)
    assert rel(out, exact_poly) < 6e-2
    assert rel(out, polar) < rel(exact_poly, polar) + 1.5e-2


def test_default_dtype_on_this_gpu() -> None:
    choice = ortho.dtype_choice(CUDA)
    major, _ = torch.cuda.get_device_capability(CUDA)
    if major >= 8:
        assert choice.dtype == torch.bfloat16 and choice.fp32_ms is None  # decided without measuring
    else:
        assert choice.dtype in (torch.bfloat16, torch.float32) and choice.fp32_ms is not None


def test_zero_nan_and_tall_views_on_the_gpu() -> None:
    Z = torch.zeros(2, 64, 96, device=CUDA)
    for method in METHODS:
        assert torch.equal(orthogonalize(Z, method, dtype="bf16"), Z)
    G = torch.randn(3, 48, 80, device=CUDA)
    G[1, 2, 3] = float("nan")
    out = orthogonalize(G, "newton_schulz", nonfinite="propagate")
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    W = torch.randn(200, 64, device=CUDA)
    for view in (W, W.T):
        torch.testing.assert_close(orthogonalize(view, "auto"), orthogonalize(view.contiguous(), "auto"), rtol=0, atol=2e-2)


# --------------------------------------------------------------------------------------------
# the optimizer step on CUDA against the CPU
# --------------------------------------------------------------------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(64, 96), nn.Linear(96, 384), nn.GELU(), nn.Linear(384, 96),
                         nn.Linear(96, 96), nn.Linear(96, 64))


def _steps(device: torch.device, steps: int = 3, mode: str | None = None, **opts: object) -> list[torch.Tensor]:
    model = _model().to(device)
    opt = Muon(model, lr=0.02, adamw_lr=1e-3, **opts)
    # mode: the whole step under torch.compile(mode=...), fullgraph ("reduce-overhead": CUDA graphs)
    step = torch.compile(opt.step, mode=mode, fullgraph=True) if mode else opt.step
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 64, (8, 16), generator=gen).to(device)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        step()
    return [p.detach().cpu() for p in model.parameters()]


def test_fp32_step_on_cuda_matches_the_cpu() -> None:
    start = [p.detach() for p in _model().parameters()]
    cpu, gpu = _steps(torch.device("cpu"), ns_dtype="fp32"), _steps(CUDA, ns_dtype="fp32")
    for s, c, g in zip(start, cpu, gpu):
        # compare the parameter changes: fp32 on both, different summation orders
        assert rel(g - s, c - s) < 1e-3


def test_default_step_on_cuda_matches_a_bf16_cpu_step() -> None:
    start = [p.detach() for p in _model().parameters()]
    cpu, gpu = _steps(torch.device("cpu"), ns_dtype="bf16"), _steps(CUDA)  # CUDA default: bf16 on sm80+
    for s, c, g in zip(start, cpu, gpu):
        assert rel(g - s, c - s) < 5e-2  # bf16 rounding of the orthogonalization, both sides


def test_compiled_step_on_cuda_matches_eager() -> None:
    eager, compiled = _steps(CUDA, ns_dtype="fp32"), _steps(CUDA, ns_dtype="fp32", compile=True)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_the_whole_step_compiles_and_is_captured_on_cuda(mode: str) -> None:
    """torch.compile(opt.step, fullgraph=True) on CUDA, and with mode="reduce-overhead" replayed as a
    CUDA graph, against the eager step (nonfinite="propagate": the gradient check is a host decision)."""
    eager = _steps(CUDA, steps=5, ns_dtype="fp32", nonfinite="propagate")
    compiled = _steps(CUDA, steps=5, mode=mode, ns_dtype="fp32", nonfinite="propagate")
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# torch.compile and CUDA graphs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,shape", [("newton_schulz", (64, 96)), ("newton_schulz", (96, 64)),
                                          ("gram", (3, 160, 640)), ("auto", (640, 160)), ("inverse_sqrt", (2, 32, 48))])
@pytest.mark.parametrize("dtype,atol", [("fp32", 2e-5), ("bf16", 3e-2)])
def test_compiled_orthogonalize_on_cuda_matches_eager(method: str, shape: tuple[int, ...], dtype: str, atol: float) -> None:
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(CUDA)
    torch.testing.assert_close(orthogonalize(G, method, dtype=dtype, compile=True), orthogonalize(G, method, dtype=dtype),
                               rtol=0, atol=atol)
    Z = torch.zeros(*shape, device=CUDA)
    assert torch.equal(orthogonalize(Z, method, dtype=dtype, compile=True), Z)


@pytest.mark.parametrize("method", ["newton_schulz", "gram", "auto"])
def test_orthogonalize_is_captured_by_a_cuda_graph(method: str) -> None:
    # no host synchronisation in the polynomial path with nonfinite="propagate" (the optimizer's
    # setting): the whole orthogonalization can be captured once and replayed
    G = torch.randn(4, 256, 1024, device=CUDA)
    ortho.default_dtype(CUDA)  # decide the dtype before capturing (a measurement cannot be captured)
    static_in = G.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs requires
            orthogonalize(static_in, method, nonfinite="propagate")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = orthogonalize(static_in, method, nonfinite="propagate")
    fresh = torch.randn(4, 256, 1024, device=CUDA)
    static_in.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, orthogonalize(fresh, method, nonfinite="propagate"), rtol=0, atol=1e-6)
