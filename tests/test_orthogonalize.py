"""Layer 1: ``muonlab.orthogonalize`` against a float64 SVD reference.

The bounds below were measured on CPU (torch 2.13.0) and carry a margin; each of them fails if
an iteration, the normalisation or the batching breaks. Matrices are small (32..128) so the file
runs in a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from muonlab import METHODS, PRESETS, normalize_frobenius, orthogonalize, resolve_schedule, scalar_map

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fp32_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default iteration dtype is the machine's choice (bf16 where bf16 matmuls are faster);
    # the bounds below are fp32 bounds, so dtype=None means fp32 here on every machine. The bf16
    # path is tested with an explicit dtype="bf16"; the choice itself in tests/test_dtype_probe.py.
    monkeypatch.setenv("MUONLAB_NS_DTYPE", "fp32")


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def polar_ref(G: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of G, in float64."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def conditioned(m: int, n: int, kappa: float, seed: int = 0) -> torch.Tensor:
    """float64 m x n matrix with singular values logspaced from 1 down to 1/kappa."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    s = torch.logspace(0.0, -math.log10(kappa), k, dtype=torch.float64)
    return (U[:, :k] * s) @ V[:, :k].T


def svals(O: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(O.double())


# (method, keyword arguments) that converge to U Vᵀ on the matrices used below
CONVERGED = [
    ("svd", {}),
    ("svd_inv_sqrt", {}),
    ("newton_schulz", {"coefficients": "polar_express", "steps": 8}),
    ("newton_schulz", {"coefficients": "taylor", "steps": 30}),
    ("newton_schulz", {"coefficients": "cubic", "steps": 40}),
    ("gram", {"coefficients": "polar_express", "steps": 8}),
    ("inverse_sqrt", {"steps": 30, "eps": 0.0}),
]
CONVERGED_IDS = [f"{m}-{kw.get('coefficients', '')}{kw.get('steps', '')}" for m, kw in CONVERGED]

# well-conditioned test inputs: wide / tall Gaussian and a square matrix with condition number 100
SHAPES = {
    "wide": lambda: randn(64, 128, seed=1),
    "tall": lambda: randn(128, 48, seed=2),
    "square_k100": lambda: conditioned(64, 64, 100.0, seed=3),
}


# --------------------------------------------------------------------------------------------
# accuracy against the float64 SVD
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("method,kwargs", CONVERGED, ids=CONVERGED_IDS)
def test_fp64_converges_tightly(kind: str, method: str, kwargs: dict) -> None:
    G = SHAPES[kind]()
    out = orthogonalize(G, method, **kwargs)
    assert out.dtype == torch.float64
    # measured 2e-15 .. 1e-13 (gram / svd_inv_sqrt on the square κ=100 matrix ~7e-14)
    assert rel_err(out, polar_ref(G)) < 1e-12


FP32_BOUNDS = {
    "svd": 3e-6,  # measured ~1.2e-6
    "svd_inv_sqrt": 1e-3,  # measured ~1e-6 on Gaussian, 3e-4 on the κ=100 square (Gram squares κ)
    "newton_schulz": 5e-6,  # measured ~1.5e-6
    "gram": 1e-4,  # measured ~1.3e-6 on Gaussian, 3e-5 on the κ=100 square
    "inverse_sqrt": 2e-4,  # measured ~5e-5
}


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("method,kwargs", CONVERGED, ids=CONVERGED_IDS)
def test_fp32_error_bounds(kind: str, method: str, kwargs: dict) -> None:
    G = SHAPES[kind]()
    out = orthogonalize(G.float(), method, **kwargs)
    assert out.dtype == torch.float32
    assert rel_err(out, polar_ref(G)) < FP32_BOUNDS[method]


def test_svd_exact_in_fp32_on_gaussian() -> None:
    eps = torch.finfo(torch.float32).eps
    for shape in [(64, 128), (96, 96), (128, 32)]:
        G = randn(*shape, seed=7)
        s = torch.linalg.svdvals(G)
        kappa = float(s[0] / s[-1])
        assert rel_err(orthogonalize(G.float(), "svd"), polar_ref(G)) < 2e-6
        # G (GᵀG)^(-1/2) forms GᵀG, whose condition number is κ²: its fp32 error grows like κ²·eps
        # (the square Gaussian has κ ≈ 219: measured 1.15e-4 on an AVX512 CPU, < 1e-4 on another)
        assert rel_err(orthogonalize(G.float(), "svd_inv_sqrt"), polar_ref(G)) < max(2e-6, 0.05 * kappa**2 * eps)


def test_svd_accurate_on_ill_conditioned_fp32() -> None:
    G = conditioned(64, 64, 1e4, seed=4)
    # the SVD does not square the condition number: measured 4.5e-5
    assert rel_err(orthogonalize(G.float(), "svd"), polar_ref(G)) < 5e-4
    # svd_inv_sqrt is exact in fp64 (measured 2.6e-10 at κ=1e4)
    assert rel_err(orthogonalize(G, "svd_inv_sqrt"), polar_ref(G)) < 1e-8


@pytest.mark.parametrize("shape", [(64, 64), (64, 128)])
def test_svd_inv_sqrt_keeps_small_singular_values_fp32(shape: tuple[int, int]) -> None:
    # σ_min/σ_max = 1/300 is far above fp32 resolution: no direction may be treated as null.
    # The Gram squares κ, so the error grows like κ²·eps (measured 1e-4 at κ=100, 1e-3 at
    # κ=300, 3e-2 at κ=1e3), but a null threshold of max(m, n)·eps·λ_max would zero the smallest
    # directions here (error ≈ 0.2).
    G = conditioned(*shape, 300.0, seed=5)
    out = orthogonalize(G.float(), "svd_inv_sqrt")
    assert rel_err(out, polar_ref(G)) < 5e-3
    s = svals(out)
    assert float(s.min()) > 0.9 and float(s.max()) < 1.1


def test_inverse_sqrt_default_eps_limits_accuracy_but_stays_close() -> None:
    G = randn(64, 128, seed=1)
    out = orthogonalize(G, "inverse_sqrt", steps=30)  # ridge eps = 1e-7 on the Gram
    err = rel_err(out, polar_ref(G))
    assert err < 1e-4  # measured 9.5e-6


@pytest.mark.parametrize("shape", [(64, 128), (96, 96), (128, 32)])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_inverse_sqrt_equals_cubic_newton_schulz(shape: tuple[int, int], steps: int) -> None:
    # Y0 = XXᵀ/tr(XXᵀ) with ‖X‖_F = 1 makes the coupled iteration the cubic NS iteration.
    G = randn(*shape, seed=5)
    a = orthogonalize(G, "inverse_sqrt", steps=steps, eps=0.0)
    b = orthogonalize(G, "newton_schulz", "cubic", steps, eps=0.0)
    assert rel_err(a, b) < 1e-13  # measured ≤ 7e-15
    a32 = orthogonalize(G.float(), "inverse_sqrt", steps=steps, eps=0.0)
    b32 = orthogonalize(G.float(), "newton_schulz", "cubic", steps, eps=0.0)
    assert rel_err(a32, b32) < 2e-5  # measured ≤ 4e-6


def test_bf16_input_keeps_bf16_and_is_close() -> None:
    G = randn(64, 96, seed=3)
    ref = polar_ref(G)
    for method, kwargs in CONVERGED:
        out = orthogonalize(G.bfloat16(), method, **kwargs)
        assert out.dtype == torch.bfloat16
        # the iteration runs in fp32 on CPU; what is left is bf16 rounding of input and output
        assert rel_err(out, ref) < 1.5e-2, method  # measured 2.5e-3


@pytest.mark.parametrize(
    "method,bound,band",
    [
        ("newton_schulz", 2e-2, (0.98, 1.02)),  # measured 7e-3, σ in [0.996, 1.005]
        ("gram", 5e-2, (0.9, 1.1)),  # measured 1.5e-2, σ in [0.958, 1.048]
    ],
)
def test_bf16_iteration_dtype(method: str, bound: float, band: tuple[float, float]) -> None:
    for seed, shape in [(0, (64, 128)), (1, (128, 64)), (2, (48, 96))]:
        G = randn(*shape, seed=seed, dtype=torch.float32)
        out = orthogonalize(G, method, "polar_express", 8, dtype="bf16")
        assert out.dtype == torch.float32
        assert rel_err(out, polar_ref(G)) < bound
        s = svals(out)
        assert band[0] < float(s.min()) and float(s.max()) < band[1]


def test_svd_methods_ignore_low_precision_dtype() -> None:
    # the SVD methods always decompose in fp32/fp64, whatever ``dtype`` says
    G = randn(64, 96, seed=3, dtype=torch.float32)
    for method in ("svd", "svd_inv_sqrt"):
        assert rel_err(orthogonalize(G, method, dtype=torch.bfloat16), polar_ref(G)) < 1e-5


# --------------------------------------------------------------------------------------------
# singular-value bands of every preset
# --------------------------------------------------------------------------------------------

# (preset, steps) -> (lo, hi): the band of the output singular values on wide and tall Gaussian
# inputs. Measured over 20 seeds on 64x128, 128x64, 32x128 (min over seeds of σ_min, max of σ_max):
#   keller 5          [0.682, 1.134]
#   taylor 5          [0.637, 1.000]     (monotone map of [0,1] into [0,1]: never above 1)
#   cubic 5           [0.235, 0.990]
#   you 5             [0.764, 1.020]
#   you 6             [0.996, 0.999]     (ends slightly below 1 by design)
#   polar_express 5   [0.870, 1.124]
#   polar_express 8   [1 - 1e-6, 1 + 1e-6]
BANDS = {
    ("keller", 5): (0.67, 1.14),
    ("taylor", 5): (0.55, 1.0 + 1e-5),
    ("cubic", 5): (0.2, 1.0 + 1e-5),
    ("you", 5): (0.75, 1.03),
    ("you", 6): (0.99, 1.0 + 1e-5),
    ("polar_express", 5): (0.86, 1.13),
    ("polar_express", 8): (1 - 1e-4, 1 + 1e-4),
}


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 128)], ids=["wide", "tall", "wide4"])
@pytest.mark.parametrize("preset,steps", list(BANDS), ids=[f"{p}{k}" for p, k in BANDS])
def test_preset_band_rectangular(shape: tuple[int, int], preset: str, steps: int) -> None:
    lo, hi = BANDS[(preset, steps)]
    for seed in (0, 1):
        G = randn(*shape, seed=seed, dtype=torch.float32)
        s = svals(orthogonalize(G, coefficients=preset, steps=steps))
        assert lo <= float(s.min()) and float(s.max()) <= hi, (preset, steps, float(s.min()), float(s.max()))


def test_keller_band_on_wide_gaussian_matches_published_range() -> None:
    # Keller's 5-step quintic on a wide Gaussian: measured [0.682, 1.134]
    s = svals(orthogonalize(randn(64, 128, seed=11, dtype=torch.float32)))
    assert 0.66 < float(s.min()) < 0.70
    assert 1.10 < float(s.max()) < 1.15


# square Gaussian matrices have σ_min ≲ σ_max / 2n, below every preset's design range, so only the
# upper edge of the band holds for all σ; most σ still land inside (measured fraction ≥ 0.82).
SQUARE_UPPER = {"keller": 1.21, "taylor": 1.0 + 1e-5, "cubic": 1.0 + 1e-5, "you": 1.03, "polar_express": 1.13}
SQUARE_INSIDE = {"keller": 0.95, "taylor": 0.8, "cubic": 0.78, "you": 0.95, "polar_express": 0.95}


@pytest.mark.parametrize("preset", list(SQUARE_UPPER))
def test_preset_band_square(preset: str) -> None:
    lo = BANDS[(preset, 5)][0]
    hi = SQUARE_UPPER[preset]
    for seed in (0, 1):
        s = svals(orthogonalize(randn(96, 96, seed=seed, dtype=torch.float32), coefficients=preset, steps=5))
        assert float(s.max()) <= hi
        assert float(s.min()) >= 0.0
        inside = float(((s >= lo) & (s <= hi)).double().mean())
        assert inside >= SQUARE_INSIDE[preset], (preset, seed, inside)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("shape", [(48, 96), (80, 80), (96, 40)])
def test_singular_values_follow_scalar_map(preset: str, shape: tuple[int, int]) -> None:
    # σ_i(orthogonalize(G)) = g^(k)(σ_i(G) / ‖G‖_F) exactly in float64 (with eps = 0)
    G = randn(*shape, seed=9)
    steps = 5
    out = orthogonalize(G, coefficients=preset, steps=steps, eps=0.0)
    x = torch.linalg.svdvals(G)
    x = x / x.norm()
    expected = scalar_map(x, resolve_schedule(preset, steps)).abs().sort(descending=True).values
    got = svals(out)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_newton_schulz_more_steps_not_worse_for_converging_presets() -> None:
    G = randn(64, 128, seed=12)
    ref = polar_ref(G)
    for preset in ("taylor", "cubic", "polar_express"):
        errs = [rel_err(orthogonalize(G, coefficients=preset, steps=k), ref) for k in (3, 6, 10, 16)]
        assert all(b <= a * 1.0001 + 1e-13 for a, b in zip(errs, errs[1:])), (preset, errs)
        assert errs[-1] < 1e-12


# --------------------------------------------------------------------------------------------
# invariances
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_scale_invariance_fp32(method: str) -> None:
    G = randn(48, 80, seed=13, dtype=torch.float32)
    base = orthogonalize(G, method)
    scales = [1e-30, 1e-20, 1e-10, 1e-3, 1e3, 1e10, 1e20, 1e30]
    # and the largest scale that keeps every entry finite in fp32
    scales.append(3e38 / float(G.abs().max()))
    for c in scales:
        Gc = G * c
        assert torch.isfinite(Gc).all()
        out = orthogonalize(Gc, method)
        assert torch.isfinite(out).all(), (method, c)
        # the only difference is the rounding of c*G to fp32 (measured ≤ 1.6e-6)
        assert rel_err(out, base) < 2e-5, (method, c)


def test_scale_invariance_subnormal_input() -> None:
    G = randn(32, 64, seed=14, dtype=torch.float32)
    Gs = G * 1e-40  # subnormal fp32: ~5 significant digits left
    assert (Gs != 0).any() and (Gs.abs() < torch.finfo(torch.float32).tiny).all()
    for method in METHODS:
        out = orthogonalize(Gs, method)
        assert torch.isfinite(out).all()
        assert rel_err(out, orthogonalize(G, method)) < 1e-3, method


def test_sign_and_orthogonal_equivariance() -> None:
    # msign(-G) = -msign(G), msign(Q G) = Q msign(G) for orthogonal Q
    G = randn(48, 96, seed=15)
    Q, _ = torch.linalg.qr(randn(48, 48, seed=16))
    for method, kwargs in CONVERGED:
        O = orthogonalize(G, method, **kwargs)
        torch.testing.assert_close(orthogonalize(-G, method, **kwargs), -O, rtol=0, atol=1e-12)
        torch.testing.assert_close(orthogonalize(Q @ G, method, **kwargs), Q @ O, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (64, 64)])
def test_transpose_equivariance(method: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    G = randn(*shape, seed=17, dtype=dtype)
    a = orthogonalize(G.T, method, "polar_express", 6)
    b = orthogonalize(G, method, "polar_express", 6).T
    if m_lt_n := shape[0] != shape[1]:
        # wide and tall inputs both run on the short side: the same computation, bit for bit
        assert m_lt_n and torch.equal(a, b)
    # a square input is not transposed internally, so G and Gᵀ are two different computations;
    # svd_inv_sqrt squares the condition number in fp32 (measured up to 3e-4 apart)
    tol = 1e-12 if dtype == torch.float64 else (2e-3 if method == "svd_inv_sqrt" else 2e-5)
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mn", [(40, 56), (56, 40)], ids=["wide", "tall"])
def test_batched_equals_loop(method: str, dtype: torch.dtype, mn: tuple[int, int]) -> None:
    m, n = mn
    B = randn(2, 3, m, n, seed=18, dtype=dtype)
    B[0, 1] *= 1e6  # batch members are normalised independently
    B[1, 2] *= 1e-6
    kwargs = {"coefficients": "keller", "steps": 5}
    out4 = orthogonalize(B, method, **kwargs)
    out3 = orthogonalize(B.reshape(6, m, n), method, **kwargs).reshape(2, 3, m, n)
    loop = torch.stack([torch.stack([orthogonalize(B[i, j], method, **kwargs) for j in range(3)]) for i in range(2)])
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert out4.shape == B.shape and out4.dtype == dtype
    torch.testing.assert_close(out4, loop, rtol=0, atol=tol)
    torch.testing.assert_close(out3, loop, rtol=0, atol=tol)


def test_input_not_modified_and_noncontiguous_ok() -> None:
    G = randn(96, 64, seed=19, dtype=torch.float32)
    Gt = G.T  # non-contiguous view, wide
    before = G.clone()
    for method in METHODS:
        out = orthogonalize(Gt, method)
        # worked on in its own layout (no transposing copy): the result is a transposed view too
        assert out.shape == Gt.shape and out.mT.is_contiguous()
        # BLAS may pick another kernel for a transposed layout: fp32 rounding differs (measured
        # up to 1.03e-6 on entries of size ~0.1, on an AVX512 CPU), so a few eps, not bit equality
        torch.testing.assert_close(out, orthogonalize(Gt.contiguous(), method), rtol=0, atol=5e-6)
        assert torch.equal(G, before)


# --------------------------------------------------------------------------------------------
# gram vs newton_schulz
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("steps", [5, 8])
def test_gram_matches_newton_schulz(preset: str, steps: int) -> None:
    for G, tol64, tol32 in [
        (randn(64, 128, seed=20), 1e-13, 1e-5),  # measured ≤ 6e-15 / 2.5e-6
        (randn(128, 48, seed=21), 1e-13, 1e-5),
        # square with κ = 100 (measured ≤ 1e-13 / 5e-5). On square Gaussian matrices, whose
        # smallest σ lie far below the presets' design range, fp32 rounding in the Gram form is
        # amplified up to ~1e-2 relative to NS: the two are then equal only in exact arithmetic.
        (conditioned(80, 80, 100.0, seed=22), 1e-12, 2e-4),
    ]:
        ns = orthogonalize(G, "newton_schulz", preset, steps)
        gr = orthogonalize(G, "gram", preset, steps)
        assert rel_err(gr, ns) < tol64
        ns32 = orthogonalize(G.float(), "newton_schulz", preset, steps)
        gr32 = orthogonalize(G.float(), "gram", preset, steps)
        assert rel_err(gr32, ns32) < tol32


def test_gram_matches_newton_schulz_custom_schedule() -> None:
    G = randn(32, 128, seed=23)
    sched = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5), (1.5, -0.5, 0.0)]
    torch.testing.assert_close(
        orthogonalize(G, "gram", sched, 4), orthogonalize(G, "newton_schulz", sched, 4), rtol=0, atol=1e-13
    )


# "auto": Gram iteration where it saves FLOPs in fp32/fp64, Newton-Schulz elsewhere
@pytest.mark.parametrize(
    "shape,dtype,expected",
    [
        ((768, 3072), torch.float32, "gram"),      # n = 4m: 0.6x the FLOPs
        ((3072, 768), torch.float32, "gram"),      # tall: the same work on the transpose
        ((128, 512), torch.float64, "gram"),
        ((768, 768), torch.float32, "newton_schulz"),   # square: Gram costs more
        ((512, 1024), torch.float32, "newton_schulz"),  # n = 2m: saves < 25%
        ((96, 512), torch.float32, "newton_schulz"),    # short side < 128: kernel overhead wins
        ((768, 2304), torch.float32, "gram"),      # n = 3m: 0.66x
        # low precision restarts every 2 steps (12m²n + 22m³ for 5 steps): worth it from n ≈ 3.6m
        ((768, 3072), torch.bfloat16, "gram"),     # n = 4m: 0.78x the FLOPs (measured 0.78-0.87x the time)
        ((3072, 768), torch.float16, "gram"),
        ((768, 2304), torch.bfloat16, "newton_schulz"),  # n = 3m: 0.83x, measured 0.90-0.95x: not worth it
        ((384, 1024), torch.bfloat16, "newton_schulz"),
    ],
)
def test_choose_method(shape, dtype, expected) -> None:
    from muonlab.orthogonalize import choose_method

    assert choose_method(*shape, 5, dtype) == expected


def test_flop_model_matches_the_documented_counts() -> None:
    from muonlab.orthogonalize import flops

    m, n, k = 768, 3072, 5
    assert flops("newton_schulz", m, n, k) == k * (4 * m * m * n + 2 * m**3)
    # one segment: X₀X₀ᵀ and P X₀, A² every step, Q P from the second step, P A₀ Pᵀ but the last
    assert flops("gram", m, n, k) == 4 * m * m * n + (8 * k - 6) * m**3
    assert flops("gram", n, m, k) == flops("gram", m, n, k)  # orientation does not matter
    # restarts before steps 2 and 4: segments of 2, 2 and 1 steps
    assert flops("gram", m, n, k, (2, 4)) == 3 * 4 * m * m * n + (10 + 10 + 2) * m**3
    assert flops("gram", m, n, k, (0, 5, 9)) == flops("gram", m, n, k)  # out-of-range restarts ignored


def test_method_flops_is_what_orthogonalize_runs() -> None:
    from muonlab.orthogonalize import choose_method, flops, gram_restarts, method_flops

    for (m, n), dt in [((768, 3072), torch.bfloat16), ((768, 3072), torch.float32), ((768, 768), torch.bfloat16),
                       ((3072, 768), torch.float16), ((384, 1024), torch.bfloat16)]:
        used = choose_method(m, n, 5, dt)
        expected = flops(used, m, n, 5, gram_restarts(5, dt) if used == "gram" else ())
        assert method_flops("auto", m, n, 5, dt) == expected
        assert method_flops("newton_schulz", m, n, 5, dt) == flops("newton_schulz", m, n, 5)
    assert method_flops("gram", 768, 3072, 5, torch.bfloat16) == flops("gram", 768, 3072, 5, (2, 4))
    assert method_flops("gram", 768, 3072, 5, torch.float32) == flops("gram", 768, 3072, 5)


@pytest.mark.parametrize("shape", [(160, 640), (640, 160), (4, 128, 512), (64, 96)])
def test_auto_is_exactly_the_method_it_chooses(shape) -> None:
    from muonlab.orthogonalize import choose_method

    G = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    chosen = choose_method(shape[-2], shape[-1], 5, torch.float32)
    assert torch.equal(orthogonalize(G, "auto"), orthogonalize(G, chosen))
    # and agrees with plain Newton-Schulz to fp32 rounding (the same polynomial)
    torch.testing.assert_close(orthogonalize(G, "auto"), orthogonalize(G, "newton_schulz"), rtol=0, atol=2e-5)


@pytest.mark.parametrize("decades", [3, 6])
def test_auto_is_as_accurate_as_newton_schulz_on_ill_conditioned_input(decades) -> None:
    # gradients have power-law spectra with many tiny singular values, where the Gram form's
    # accumulated product P (norm up to a^k ~ 480) drifts more than the plain iteration: measured
    # relative distance to the fp64 iteration at 160x640, 3 / 6 decades: NS 3.6e-6 / 6.9e-6,
    # gram 5.0e-5 / 9.3e-5; at 768x3072 both ~5e-5. That is far below the distance of Keller's
    # polynomial from the exact polar factor (~0.15) and of a bf16 iteration (~1e-2), and the
    # distance to U Vᵀ is unchanged.
    m, n = 160, 640
    gen = torch.Generator().manual_seed(decades)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    G = (U * torch.logspace(0, -decades, m, dtype=torch.float64)) @ V.T
    ref = orthogonalize(G, "newton_schulz")  # the same polynomial in fp64

    def rel(O: torch.Tensor) -> float:
        return float((O.double() - ref).norm() / ref.norm())

    ns32, auto32 = orthogonalize(G.float(), "newton_schulz"), orthogonalize(G.float(), "auto")
    assert rel(auto32) < 2e-4, (rel(auto32), rel(ns32))
    polar = orthogonalize(G, "svd")

    def to_polar(O: torch.Tensor) -> float:
        return float((O.double() - polar).norm() / polar.norm())

    assert abs(to_polar(auto32) - to_polar(ns32)) < 1e-5 * to_polar(ns32) + 1e-6


@pytest.mark.parametrize("shape,expected", [((128, 640), "gram"), ((640, 128), "gram"), ((128, 384), "newton_schulz")])
def test_auto_in_bf16_is_exactly_the_method_it_chooses(shape, expected) -> None:
    from muonlab.orthogonalize import choose_method

    assert choose_method(*shape, 5, torch.bfloat16) == expected
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    assert torch.equal(orthogonalize(G, "auto", dtype="bf16"), orthogonalize(G, expected, dtype="bf16"))


def power_law(m: int, n: int, alpha: float, seed: int) -> torch.Tensor:
    """float64 m x n with σ_k = k^-alpha: the spectra of real gradients and momenta, where most
    directions are far below the largest one."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (U * torch.arange(1, k + 1, dtype=torch.float64) ** (-alpha)) @ V.T


@pytest.mark.parametrize("preset,steps", [("keller", 5), ("polar_express", 5), ("polar_express", 8), ("you", 6)])
def test_gram_bf16_with_restarts_is_as_close_to_the_polar_factor_as_newton_schulz(preset: str, steps: int) -> None:
    # Without restarts, a bf16 Gram iteration blows up on such spectra (errors of 1e2..1e6 were
    # measured with Polar Express; see the next test). With a restart every 2 steps the excess over
    # plain bf16 Newton-Schulz was <= 5e-3 for every preset on real momenta, Gaussian and
    # power-law matrices (measured here <= 4e-3).
    for G in (randn(128, 512, seed=40), power_law(128, 512, 1.0, seed=41), power_law(512, 128, 0.5, seed=42)):
        ref = polar_ref(G)
        ns = orthogonalize(G.float(), "newton_schulz", preset, steps, dtype="bf16")
        gr = orthogonalize(G.float(), "gram", preset, steps, dtype="bf16")
        assert torch.isfinite(gr).all()
        assert rel_err(gr, ref) < rel_err(ns, ref) + 1e-2, (rel_err(gr, ref), rel_err(ns, ref))


def test_gram_bf16_without_restarts_drifts_which_is_why_they_exist() -> None:
    import sys

    mod = sys.modules["muonlab.orthogonalize"]
    G = power_law(128, 512, 1.0, seed=41)
    sched = resolve_schedule("polar_express", 5)
    X = mod._prescale(G.float().unsqueeze(0), torch.bfloat16, 1e-7)
    ref = polar_ref(G)
    restarted = mod.newton_schulz_gram(X, sched, restarts=mod.gram_restarts(5, torch.bfloat16))[0]
    plain = mod.newton_schulz_gram(X, sched, restarts=())[0]
    assert rel_err(restarted, ref) < 0.2
    assert not (rel_err(plain, ref) < 0.5)  # measured > 1 (or NaN): spurious eigenvalues grew


@pytest.mark.parametrize("method", ["newton_schulz", "gram"])
@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (3, 40, 72)])
def test_folded_normalization_equals_normalizing_first(method: str, shape: tuple) -> None:
    # The first step absorbs X / (‖X‖_F + eps) (no pass over X for it): in float64 the result equals
    # normalizing first and iterating plainly, up to rounding.
    G = randn(*shape, seed=43)
    X = G if shape[-2] <= shape[-1] else G.mT
    X = normalize_frobenius(X, eps=1e-7)
    for a, b, c in resolve_schedule("keller", 5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    expected = X if shape[-2] <= shape[-1] else X.mT
    torch.testing.assert_close(orthogonalize(G, method), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_result_keeps_the_input_layout(method: str) -> None:
    W = randn(96, 40, seed=44, dtype=torch.float32)  # tall, contiguous
    for G in (W, W.T, W[None].expand(2, 96, 40).contiguous(), W.T[None].expand(2, 40, 96)):
        out = orthogonalize(G, method)
        flipped = G.stride(-1) != 1
        assert out.shape == G.shape
        assert (out.mT if flipped else out).is_contiguous(), (method, G.stride())
        torch.testing.assert_close(out, orthogonalize(G.contiguous(), method), rtol=0, atol=5e-6)


# --------------------------------------------------------------------------------------------
# zero, rank-deficient, tiny
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(32, 48), (48, 32), (3, 32, 32)])
def test_zero_matrix_maps_to_zero(method: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    out = orthogonalize(torch.zeros(shape, dtype=dtype), method)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("method", METHODS)
def test_zero_member_of_batch(method: str) -> None:
    B = randn(3, 32, 48, seed=24, dtype=torch.float32)
    B[1] = 0
    out = orthogonalize(B, method)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(32, 48))
    torch.testing.assert_close(out[0], orthogonalize(B[0], method), rtol=0, atol=1e-6)


def test_normalize_frobenius_zero_and_scale() -> None:
    X = torch.zeros(2, 4, 5)
    X[1] = randn(4, 5, seed=25, dtype=torch.float32) * 1e30
    for eps in (0.0, 1e-7):
        Y = normalize_frobenius(X, eps=eps)
        assert torch.isfinite(Y).all()
        assert torch.equal(Y[0], torch.zeros(4, 5))
        assert abs(float(Y[1].norm()) - 1.0) < 1e-5


def _rank_deficient(m: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    A = randn(m, r, seed=seed)
    B = randn(r, n, seed=seed + 1000)
    G = A @ B
    U, _, Vh = torch.linalg.svd(G, full_matrices=True)
    return G, U[:, :r] @ Vh[:r], Vh[r:].T, U[:, r:]


RANK_CASES = [(64, 96, 20), (96, 64, 20), (64, 64, 32)]


@pytest.mark.parametrize("m,n,r", RANK_CASES)
@pytest.mark.parametrize("method", ["svd", "svd_inv_sqrt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_exact_methods(m: int, n: int, r: int, method: str, dtype: torch.dtype) -> None:
    G, ref, null_right, null_left = _rank_deficient(m, n, r, seed=26)
    O = orthogonalize(G.to(dtype), method).double()
    tol = 1e-12 if dtype == torch.float64 else 2e-5  # measured ≤ 2e-14 / 1e-5
    assert float((O @ null_right).norm()) < tol
    assert float((null_left.T @ O).norm()) < tol
    assert rel_err(O, ref) < (1e-12 if dtype == torch.float64 else 1e-5)
    # the output is a partial isometry of rank r
    s = svals(O)
    assert (s[:r] - 1).abs().max() < 1e-4
    assert s[r:].max() < 1e-4


@pytest.mark.parametrize("m,n,r", RANK_CASES)
@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("newton_schulz", {"coefficients": "polar_express", "steps": 8}),
        ("newton_schulz", {"coefficients": "taylor", "steps": 20}),
        ("newton_schulz", {"coefficients": "keller", "steps": 5}),
        ("gram", {"coefficients": "polar_express", "steps": 8}),
        ("inverse_sqrt", {"steps": 30}),
    ],
    ids=["ns-pe8", "ns-taylor20", "ns-keller5", "gram-pe8", "inverse_sqrt30"],
)
def test_rank_deficient_iterations_fp64(m: int, n: int, r: int, method: str, kwargs: dict) -> None:
    # odd polynomials map σ = 0 to 0: null directions stay null (measured ≤ 1.3e-10)
    G, ref, null_right, null_left = _rank_deficient(m, n, r, seed=27)
    O = orthogonalize(G, method, **kwargs)
    assert float((O @ null_right).norm()) < 1e-8
    assert float((null_left.T @ O).norm()) < 1e-8
    if kwargs.get("coefficients") != "keller":
        assert rel_err(O, ref) < 2e-5  # inverse_sqrt's ridge eps: measured 1.1e-5


def test_rank_deficient_newton_schulz_fp32_null_directions_small() -> None:
    # in fp32 the product A @ B is rank-deficient only up to rounding (σ ~ 1e-7), which the
    # polynomials amplify; the null directions still get only a small share of the output.
    G, _, null_right, _ = _rank_deficient(64, 96, 20, seed=28)
    for preset, steps, bound in [("polar_express", 8, 5e-3), ("keller", 5, 5e-4)]:
        O = orthogonalize(G.float(), coefficients=preset, steps=steps).double()
        assert float((O @ null_right).norm()) < bound  # measured 5e-4 and 4e-5


def test_one_by_one_is_sign() -> None:
    for method in METHODS:
        kwargs = {"coefficients": "polar_express", "steps": 8} if method != "inverse_sqrt" else {"steps": 30}
        out = orthogonalize(torch.tensor([[-3.0]]), method, **kwargs)
        assert abs(float(out) + 1.0) < 1e-4, method
        out = orthogonalize(torch.tensor([[2.5]], dtype=torch.float64), method, **kwargs)
        assert abs(float(out) - 1.0) < 1e-6, method


# --------------------------------------------------------------------------------------------
# non-finite input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_raises_with_shape(method: str, bad: float) -> None:
    G = randn(2, 24, 40, seed=29, dtype=torch.float32)
    G[1, 3, 4] = bad
    with pytest.raises(ValueError, match=r"\(2, 24, 40\)") as info:
        orthogonalize(G, method)
    assert "non-finite" in str(info.value)
    assert "propagate" in str(info.value)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_propagate_returns_nan(method: str, bad: float) -> None:
    G = randn(3, 24, 40, seed=30, dtype=torch.float32)
    G[1, 3, 4] = bad
    out = orthogonalize(G, method, nonfinite="propagate")
    assert out.shape == G.shape
    assert torch.isnan(out[1]).all()
    # the finite members of the batch are unaffected
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    torch.testing.assert_close(out[0], orthogonalize(G[0], method), rtol=0, atol=1e-6)


def test_nonfinite_propagate_single_matrix() -> None:
    G = randn(24, 40, seed=31, dtype=torch.float32)
    G[0, 0] = float("nan")
    for method in METHODS:
        assert torch.isnan(orthogonalize(G, method, nonfinite="propagate")).any(), method


# --------------------------------------------------------------------------------------------
# shapes, dtypes and argument errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (0, 3, 4), (2, 0, 4), (2, 4, 0), (0, 2, 3, 4)])
def test_empty_returns_empty_same_shape(method: str, shape: tuple[int, ...]) -> None:
    for dtype in (torch.float32, torch.float64):
        out = orthogonalize(torch.empty(shape, dtype=dtype), method)
        assert out.shape == shape and out.dtype == dtype and out.numel() == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(5,), (), (0,)])
def test_low_rank_tensors_raise_naming_shape(method: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"shape \(" + ("5,?" if shape == (5,) else "0,?" if shape else "") + r"\)"):
        orthogonalize(torch.ones(shape), method)


@pytest.mark.parametrize("method", METHODS)
def test_complex_raises_typeerror(method: str) -> None:
    with pytest.raises(TypeError, match="complex"):
        orthogonalize(torch.randn(4, 6, dtype=torch.complex64), method)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_dtype_raises_typeerror(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="floating-point"):
        orthogonalize(torch.ones(4, 6, dtype=dtype))


def test_non_tensor_raises_typeerror() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        orthogonalize([[1.0, 2.0], [3.0, 4.0]])  # type: ignore[arg-type]


def test_unknown_method_lists_valid() -> None:
    with pytest.raises(ValueError) as info:
        orthogonalize(torch.randn(4, 4), "qr")  # type: ignore[arg-type]
    for name in METHODS:
        assert name in str(info.value)
    assert "'qr'" in str(info.value)


def test_unknown_preset_lists_valid() -> None:
    with pytest.raises(ValueError) as info:
        orthogonalize(torch.randn(4, 4), coefficients="kellr")
    for name in PRESETS:
        assert name in str(info.value)


@pytest.mark.parametrize("method", ["newton_schulz", "gram", "inverse_sqrt"])
@pytest.mark.parametrize("steps", [0, -1])
def test_steps_below_one_raise(method: str, steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):
        orthogonalize(torch.randn(4, 6), method, steps=steps)
    # also when the input is empty (validation comes first)
    with pytest.raises(ValueError, match="steps"):
        orthogonalize(torch.randn(0, 6), method, steps=steps)


@pytest.mark.parametrize("steps", [2.0, True, "5"])
def test_steps_wrong_type(steps: object) -> None:
    with pytest.raises((TypeError, ValueError), match="steps"):
        orthogonalize(torch.randn(4, 6), steps=steps)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "coefficients,exc",
    [
        ((1.0, 2.0), ValueError),
        ((1.0, 2.0, 3.0, 4.0), ValueError),
        ((1.0, float("nan"), 3.0), ValueError),
        ([(3.0, -3.0, 1.0), (1.0, float("inf"), 3.0)], ValueError),
        ([(3.0, -3.0, 1.0), (1.0, 2.0)], ValueError),
        ([], ValueError),
        (("a", "b", "c"), TypeError),
        ([(3.0, -3.0, 1.0), 5.0], TypeError),
        (torch.tensor([1.5, -0.5, 0.0]), TypeError),
    ],
)
def test_bad_coefficients_raise(coefficients: object, exc: type) -> None:
    for method in ("newton_schulz", "gram"):
        with pytest.raises(exc, match="coefficients"):
            orthogonalize(torch.randn(4, 6), method, coefficients=coefficients)  # type: ignore[arg-type]


def test_bad_keyword_values_raise() -> None:
    G = torch.randn(4, 6)
    with pytest.raises(ValueError, match="nonfinite"):
        orthogonalize(G, nonfinite="ignore")  # type: ignore[arg-type]
    for eps in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            orthogonalize(G, eps=eps)
    with pytest.raises(ValueError, match="dtype"):
        orthogonalize(G, dtype="int8")
    with pytest.raises(ValueError, match="dtype"):
        orthogonalize(G, dtype=torch.int32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("work", [None, "fp32", torch.float64, "bf16"])
def test_output_dtype_equals_input_dtype(method: str, in_dtype: torch.dtype, work: object) -> None:
    G = randn(16, 24, seed=32, dtype=in_dtype)
    out = orthogonalize(G, method, dtype=work)  # type: ignore[arg-type]
    assert out.dtype == in_dtype
    assert out.shape == G.shape
    assert torch.isfinite(out).all()


def test_custom_coefficients_single_and_schedule() -> None:
    G = randn(32, 64, seed=33)
    k = orthogonalize(G, coefficients="keller", steps=5)
    torch.testing.assert_close(orthogonalize(G, coefficients=(3.4445, -4.7750, 2.0315), steps=5), k, rtol=0, atol=0)
    torch.testing.assert_close(orthogonalize(G, coefficients=[(3.4445, -4.7750, 2.0315)], steps=5), k, rtol=0, atol=0)
    # a preset name is case- and dash-insensitive
    torch.testing.assert_close(
        orthogonalize(G, coefficients="Polar-Express", steps=6),
        orthogonalize(G, coefficients="polar_express", steps=6),
        rtol=0,
        atol=0,
    )
    # a per-step schedule shorter than steps repeats its last entry
    sched = [(3.0, -3.2, 1.2), (1.875, -1.25, 0.375)]
    torch.testing.assert_close(
        orthogonalize(G, coefficients=sched, steps=4),
        orthogonalize(G, coefficients=[sched[0]] + [sched[1]] * 3, steps=4),
        rtol=0,
        atol=0,
    )


def test_docstring_example() -> None:
    torch.manual_seed(0)
    G = torch.randn(64, 256)
    s = torch.linalg.svdvals(orthogonalize(G, coefficients="polar_express", steps=8))
    assert bool((s > 0.9).all() and (s < 1.1).all())


# --------------------------------------------------------------------------------------------
# out=
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_out_receives_the_result_in_its_own_dtype_and_layout(method: str) -> None:
    G = randn(2, 40, 72, seed=45, dtype=torch.float32)
    expected = orthogonalize(G, method)
    for out in (torch.empty_like(G), torch.empty(2, 72, 40).mT, torch.empty_like(G, dtype=torch.float64)):
        got = orthogonalize(G, method, out=out)
        assert got is out
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=1e-6)
    half = torch.empty_like(G, dtype=torch.bfloat16)
    orthogonalize(G, method, out=half)
    torch.testing.assert_close(half, expected.bfloat16(), rtol=0, atol=0)
    inplace = G.clone()
    assert orthogonalize(inplace, method, out=inplace) is inplace
    torch.testing.assert_close(inplace, expected, rtol=0, atol=1e-6)


def test_out_must_match_g() -> None:
    G = torch.randn(8, 12)
    for bad in (torch.empty(12, 8), torch.empty(8, 12, dtype=torch.int64), "x"):
        with pytest.raises(ValueError, match=r"out must be a floating tensor of G's shape \(8, 12\)"):
            orthogonalize(G, out=bad)  # type: ignore[arg-type]
    empty = torch.empty(0, 5)
    assert orthogonalize(torch.empty(0, 5), out=empty) is empty
