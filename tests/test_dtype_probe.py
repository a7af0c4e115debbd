"""The default iteration dtype is the machine's choice: both branches of the decision, its cache,
the environment override and the explicit dtype that always wins.

The probe itself (a timed matmul) is replaced by a stub here, except in one test that runs it
for real and checks only that it returns a valid decision: timings are never asserted.
"""

from __future__ import annotations

import sys

import pytest
import torch

from muonlab import orthogonalize

# ``muonlab.orthogonalize`` as an attribute is the function; the module is in sys.modules
ortho = sys.modules["muonlab.orthogonalize"]

CPU = torch.device("cpu")


class ProbeStub:
    """Replaces ``_probe_matmul_seconds``: returns fixed (fp32, bf16) seconds and counts calls."""

    def __init__(self, fp32_s: float, bf16_s: float) -> None:
        self.result = (fp32_s, bf16_s)
        self.devices: list[torch.device] = []

    def __call__(self, device: torch.device) -> tuple[float, float]:
        self.devices.append(device)
        return self.result


@pytest.fixture()
def fresh(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An empty decision cache and no environment override, restored afterwards."""
    monkeypatch.setattr(ortho, "_DTYPE_CACHE", {})
    monkeypatch.delenv(ortho.NS_DTYPE_ENV, raising=False)
    return monkeypatch


def stub_probe(mp: pytest.MonkeyPatch, fp32_s: float, bf16_s: float) -> ProbeStub:
    stub = ProbeStub(fp32_s, bf16_s)
    mp.setattr(ortho, "_probe_matmul_seconds", stub)
    return stub


def forbid_probe(mp: pytest.MonkeyPatch) -> None:
    def fail(device: torch.device) -> tuple[float, float]:
        raise AssertionError(f"the probe ran for {device}")

    mp.setattr(ortho, "_probe_matmul_seconds", fail)


# --------------------------------------------------------------------------------------------
# the two branches of the measurement, and the cache
# --------------------------------------------------------------------------------------------


def test_bf16_chosen_where_bf16_matmul_is_faster(fresh: pytest.MonkeyPatch) -> None:
    stub = stub_probe(fresh, fp32_s=2.0e-3, bf16_s=0.5e-3)
    choice = ortho.dtype_choice(CPU)
    assert choice.dtype == torch.bfloat16
    assert choice.fp32_ms == pytest.approx(2.0) and choice.bf16_ms == pytest.approx(0.5)
    assert "4.0x faster" in choice.reason
    assert ortho.resolve_dtype(None, CPU, torch.float32) == torch.bfloat16
    assert stub.devices == [CPU]


@pytest.mark.parametrize("bf16_s", [5.0e-3, 1.0e-3, 0.9e-3, float("inf")],
                         ids=["much-slower", "equal", "barely-faster", "unavailable"])
def test_fp32_chosen_where_bf16_is_not_clearly_faster(fresh: pytest.MonkeyPatch, bf16_s: float) -> None:
    # bf16 costs accuracy, so it needs at least a 1.25x speed-up (time ratio <= 0.8)
    stub_probe(fresh, fp32_s=1.0e-3, bf16_s=bf16_s)
    choice = ortho.dtype_choice(CPU)
    assert choice.dtype == torch.float32, choice
    assert ortho.resolve_dtype(None, CPU, torch.bfloat16) == torch.float32


def test_probe_runs_once_per_device_and_is_cached(fresh: pytest.MonkeyPatch) -> None:
    stub = stub_probe(fresh, fp32_s=1.0, bf16_s=0.1)
    fresh.setattr(ortho, "_cuda_native_bf16", lambda device: False)  # a GPU without bf16 units: measured too
    for _ in range(3):
        assert ortho.default_dtype(CPU) == torch.bfloat16
        assert ortho.default_dtype("cpu") == torch.bfloat16
        orthogonalize(torch.randn(8, 16))
    assert stub.devices == [CPU]
    ortho.default_dtype(torch.device("cuda", 0))
    ortho.default_dtype(torch.device("cuda", 1))
    ortho.default_dtype(torch.device("cuda", 0))
    assert stub.devices == [CPU, torch.device("cuda", 0), torch.device("cuda", 1)]
    assert set(ortho._DTYPE_CACHE) == {("cpu", None), ("cuda", 0), ("cuda", 1)}


def test_cuda_with_native_bf16_takes_bf16_without_measuring(fresh: pytest.MonkeyPatch) -> None:
    forbid_probe(fresh)
    fresh.setattr(ortho, "_cuda_native_bf16", lambda device: True)
    choice = ortho.dtype_choice(torch.device("cuda", 0))
    assert choice.dtype == torch.bfloat16 and "capability" in choice.reason
    assert ortho.resolve_dtype(None, torch.device("cuda", 0), torch.float32) == torch.bfloat16


def test_older_cuda_gpu_is_measured(fresh: pytest.MonkeyPatch) -> None:
    stub = stub_probe(fresh, fp32_s=1.0e-3, bf16_s=3.0e-3)  # e.g. a V100: bf16 emulated
    fresh.setattr(ortho, "_cuda_native_bf16", lambda device: False)
    assert ortho.default_dtype(torch.device("cuda", 0)) == torch.float32
    assert stub.devices == [torch.device("cuda", 0)]


# --------------------------------------------------------------------------------------------
# what always wins over the measurement
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given,expected", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                            (torch.float16, torch.float16), ("float64", torch.float64)])
def test_explicit_dtype_always_wins(fresh: pytest.MonkeyPatch, given: object, expected: torch.dtype) -> None:
    forbid_probe(fresh)
    fresh.setenv(ortho.NS_DTYPE_ENV, "fp16")  # not even the environment overrides an explicit dtype
    for input_dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert ortho.resolve_dtype(given, CPU, input_dtype) == expected  # type: ignore[arg-type]


def test_fp64_input_keeps_fp64(fresh: pytest.MonkeyPatch) -> None:
    forbid_probe(fresh)
    assert ortho.resolve_dtype(None, CPU, torch.float64) == torch.float64
    G = torch.randn(16, 24, dtype=torch.float64)
    assert orthogonalize(G).dtype == torch.float64


@pytest.mark.parametrize("value,expected", [("bf16", torch.bfloat16), ("FP32", torch.float32),
                                            (" float32 ", torch.float32), ("fp16", torch.float16)])
def test_environment_variable_replaces_the_measurement(fresh: pytest.MonkeyPatch, value: str,
                                                       expected: torch.dtype) -> None:
    forbid_probe(fresh)
    fresh.setenv(ortho.NS_DTYPE_ENV, value)
    assert ortho.default_dtype(CPU) == expected
    assert ortho.resolve_dtype(None, CPU, torch.float32) == expected
    assert ortho.NS_DTYPE_ENV in ortho.dtype_choice(CPU).reason
    assert ortho._DTYPE_CACHE == {}  # nothing measured, nothing cached


@pytest.mark.parametrize("value", ["auto", "", "  "])
def test_environment_auto_or_empty_measures(fresh: pytest.MonkeyPatch, value: str) -> None:
    stub = stub_probe(fresh, fp32_s=1.0, bf16_s=0.1)
    fresh.setenv(ortho.NS_DTYPE_ENV, value)
    assert ortho.default_dtype(CPU) == torch.bfloat16
    assert len(stub.devices) == 1


def test_bad_environment_value_names_the_variable(fresh: pytest.MonkeyPatch) -> None:
    fresh.setenv(ortho.NS_DTYPE_ENV, "int8")
    with pytest.raises(ValueError, match=r"MUONLAB_NS_DTYPE.*'int8'"):
        ortho.default_dtype(CPU)


# --------------------------------------------------------------------------------------------
# the decision reaches orthogonalize() and the optimizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("probed,name", [((1.0, 0.1), "bf16"), ((1.0, 10.0), "fp32")])
def test_orthogonalize_default_runs_in_the_probed_dtype(fresh: pytest.MonkeyPatch, probed: tuple[float, float],
                                                        name: str) -> None:
    stub_probe(fresh, *probed)
    G = torch.randn(2, 48, 96, generator=torch.Generator().manual_seed(0))
    for method in ("newton_schulz", "gram", "auto"):
        assert torch.equal(orthogonalize(G, method), orthogonalize(G, method, dtype=name)), method


@pytest.mark.parametrize("probed,name", [((1.0, 0.1), "bf16"), ((1.0, 10.0), "fp32")])
def test_muon_default_step_uses_the_probed_dtype(fresh: pytest.MonkeyPatch, probed: tuple[float, float],
                                                 name: str) -> None:
    from muonlab import Muon

    stub_probe(fresh, *probed)

    def step(ns_dtype: object) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(64, 32, bias=False))
        opt = Muon(model, lr=0.02, ns_dtype=ns_dtype)
        model(torch.randn(8, 32)).square().mean().backward()
        opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(step(None), step(name))


def test_real_probe_returns_a_valid_decision_and_leaves_the_rng_alone(fresh: pytest.MonkeyPatch) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    choice = ortho._choose_dtype(CPU)
    assert torch.equal(torch.get_rng_state(), before)
    assert choice.dtype in (torch.bfloat16, torch.float32)
    assert choice.fp32_ms is not None and choice.fp32_ms > 0
    assert choice.reason
    fp32_s, bf16_s = ortho._probe_matmul_seconds(CPU)
    assert fp32_s > 0 and bf16_s > 0


# --------------------------------------------------------------------------------------------
# the bf16 default stays within the float64 SVD error band
# --------------------------------------------------------------------------------------------


def _polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# (distance from the same polynomial in float64, excess distance from U Vᵀ over it), measured
# on these inputs: newton_schulz 1.1e-2..1.5e-2 / <= 1e-3; gram (bf16, restarted every 3 steps)
# 1.8e-2..3.8e-2 / <= 9e-3 (the largest on the small 64x160 and 96x96 matrices, which "auto"
# leaves to newton_schulz). Keller's own distance from U Vᵀ is ~0.15-0.22 on these matrices.
BF16_BOUNDS = {"newton_schulz": (2.5e-2, 4e-3), "gram": (6e-2, 1.5e-2), "auto": (6e-2, 1.5e-2)}


@pytest.mark.parametrize("method", ["newton_schulz", "gram", "auto"])
@pytest.mark.parametrize("shape", [(128, 512), (512, 128), (96, 96), (3, 64, 160), (256, 1024)])
def test_bf16_default_is_in_keller_band_of_the_svd(fresh: pytest.MonkeyPatch, method: str, shape: tuple) -> None:
    # Where the machine picks bf16, the optimizer's default (Keller x5) must be as far from
    # U Vᵀ as the same polynomial in float64, up to bf16 rounding.
    stub_probe(fresh, fp32_s=1.0, bf16_s=0.1)
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    out = orthogonalize(G.float(), method)
    assert out.dtype == torch.float32
    exact_poly = orthogonalize(G, "newton_schulz")  # Keller x5 in float64
    polar = _polar(G)
    to_poly, excess = BF16_BOUNDS[method]
    assert _rel(out, exact_poly) < to_poly
    assert _rel(out, polar) < _rel(exact_poly, polar) + excess
    s, s64 = torch.linalg.svdvals(out.double()), torch.linalg.svdvals(exact_poly)
    # the singular values stay in the float64 polynomial's band (Keller: [0.68, 1.13] on
    # rectangular Gaussian matrices), widened by bf16 rounding
    assert float(s64.min()) - 0.03 < float(s.min()) and float(s.max()) < float(s64.max()) + 0.03
