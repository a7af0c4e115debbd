"""Layer 1: msign(G) = U Vᵀ, the orthogonal polar factor, by several methods.

Pure tensor -> tensor functions: no state, no torch.distributed, no nn.Module.

For G = U Σ Vᵀ, msign(G) = U Vᵀ = G (GᵀG)^(-1/2) = (G Gᵀ)^(-1/2) G (seed 000). It keeps the
"rotation" of G and drops its singular values. Methods:

* ``"svd"``: the exact polar factor from ``torch.linalg.svd`` (the reference); singular
  directions with σ below ``max(m, n)·eps_dtype·σ_max`` are treated as null and map to 0.
* ``"svd_inv_sqrt"``: the seed's formulation G (GᵀG)^(-1/2), with the inverse square root from
  an eigendecomposition of the small Gram matrix (pseudo-inverse on its null space).
* ``"newton_schulz"``: the odd-polynomial iteration X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X with a
  coefficient schedule (see :mod:`muonlab.coefficients`).
* ``"gram"``: the same polynomial iteration carried out on the small m x m Gram matrix;
  the accumulated polynomial is applied to G once at the end (fewer FLOPs when m << n). In
  bf16/fp16 it restarts from X <- P X every 2 steps, which keeps it stable.
* ``"inverse_sqrt"``: the coupled Newton-Schulz iteration for (GGᵀ + eps I)^(-1/2) of seed 002.
* ``"auto"``: ``"gram"`` where it needs at most 0.8 of ``"newton_schulz"``'s FLOPs (for 5 steps
  n >= ~2.2m in fp32/fp64, n >= ~3.6m in bf16/fp16) and the short side is at least 128;
  ``"newton_schulz"`` otherwise (see :func:`choose_method`). Both run the same polynomial, so the
  choice changes only rounding.

Inputs of shape (..., m, n) are batches of matrices. The work is always done on the short side,
without transposing: a tall matrix is iterated on XᵀX (a transposing copy costs as much as several
products on a CPU), and a transposed view is worked on in its own memory layout, which the result
keeps.

The iteration dtype: an explicit ``dtype`` always wins; otherwise fp64 input stays fp64 and every
other input runs in :func:`default_dtype` of its device (``$MUONLAB_NS_DTYPE``, else bf16 on CUDA
GPUs with native bf16, else whichever of bf16/fp32 a one-time matmul measurement finds faster).
See docs/performance.md.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .coefficients import CoefficientSpec, Triple, resolve_schedule

METHODS = ("newton_schulz", "gram", "inverse_sqrt", "svd", "svd_inv_sqrt", "auto")
Method = Literal["newton_schulz", "gram", "inverse_sqrt", "svd", "svd_inv_sqrt", "auto"]
# the methods that run a polynomial (Newton-Schulz) schedule: they take coefficients, and their input
# is prescaled by its largest |entry| ("auto" resolves to one of the first two)
POLYNOMIAL_METHODS = ("newton_schulz", "gram", "auto")
NonFinitePolicy = Literal["raise", "propagate"]

_DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}


# --------------------------------------------------------------------------------------------
# The iteration dtype: chosen by the machine (a capability check or a one-time measurement)
# --------------------------------------------------------------------------------------------

#: Environment variable that replaces the measured default iteration dtype (``bf16``, ``fp32``, ...;
#: ``auto`` or empty: measure). An explicit ``dtype=`` argument still wins over it.
NS_DTYPE_ENV = "MUONLAB_NS_DTYPE"

# The probe times a _PROBE_SIZE² matmul in fp32 and bf16, _PROBE_ROUNDS times interleaved, and
# takes bf16 when its best time is at most _BF16_MAX_TIME_RATIO of fp32's: bf16 costs accuracy
# (~1e-2 relative in the update), so it must buy a clear speed-up. 256 is large enough to reach
# the fast kernels (on an AVX512-BF16/AMX Xeon: fp32 0.19 ms, bf16 0.05 ms) and small enough
# that a CPU without bf16 units, where one such matmul takes ~30 ms, pays well under 0.2 s once.
_PROBE_SIZE = 256
_PROBE_ROUNDS = 3
_PROBE_MAX_ROUNDS = 10
_BF16_MAX_TIME_RATIO = 0.8


@dataclass(frozen=True)
class DtypeChoice:
    """What :func:`default_dtype` decided for one device, and why."""

    dtype: torch.dtype
    reason: str
    fp32_ms: Optional[float] = None
    bf16_ms: Optional[float] = None


_DTYPE_CACHE: dict[tuple[str, Optional[int]], DtypeChoice] = {}


def _parse_dtype(dtype: "torch.dtype | str", where: str) -> torch.dtype:
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        if key not in _DTYPE_NAMES:
            raise ValueError(f"{where}: unknown dtype {dtype!r}; valid: {sorted(set(_DTYPE_NAMES))}")
        return _DTYPE_NAMES[key]
    if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        return dtype
    raise ValueError(f"{where}: unsupported iteration dtype {dtype!r}; use bf16, fp16, fp32 or fp64")


def resolve_dtype(dtype: "torch.dtype | str | None", device: torch.device, input_dtype: torch.dtype) -> torch.dtype:
    """The iteration dtype for an input of ``input_dtype`` on ``device``.

    An explicit ``dtype`` is always used as given. ``None``: fp64 input keeps fp64; otherwise the
    dtype :func:`default_dtype` chose for this device (``$MUONLAB_NS_DTYPE`` if set, else bf16 on
    CUDA GPUs with native bf16 and, on other devices, whichever of bf16/fp32 a one-time matmul
    measurement finds clearly faster).
    """
    if dtype is not None:
        return _parse_dtype(dtype, "dtype")
    if input_dtype == torch.float64:
        return torch.float64
    return default_dtype(device)


def default_dtype(device: "torch.device | str") -> torch.dtype:
    """The iteration dtype used when none is given, decided once per process and device.

    Order: the environment variable ``MUONLAB_NS_DTYPE`` (read on every call, so tests and users
    can set it at any time); else a cached decision per (device type, index): a CUDA GPU with
    compute capability >= 8.0 (native bf16 tensor cores) takes bf16 without measuring; any other
    device (CPU, older GPUs, MPS, ...) times a 256x256 matmul in fp32 and bf16 and takes bf16 only
    where it is at least 1.25x faster (:func:`dtype_choice` tells what was measured).
    """
    return dtype_choice(device).dtype


def dtype_choice(device: "torch.device | str") -> DtypeChoice:
    """The :class:`DtypeChoice` behind :func:`default_dtype` for ``device`` (measured on first use)."""
    device = torch.device(device)
    env = os.environ.get(NS_DTYPE_ENV, "").strip()
    if env and env.lower() != "auto":
        return DtypeChoice(_parse_dtype(env, f"environment variable {NS_DTYPE_ENV}"), f"{NS_DTYPE_ENV}={env}")
    key = _device_key(device)
    choice = _DTYPE_CACHE.get(key)
    if choice is None:
        choice = _DTYPE_CACHE[key] = _choose_dtype(device)
    return choice


def _device_key(device: torch.device) -> tuple[str, Optional[int]]:
    index = device.index
    if index is None and device.type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
    return (device.type, index)


def _choose_dtype(device: torch.device) -> DtypeChoice:
    if device.type == "cuda" and _cuda_native_bf16(device):
        return DtypeChoice(torch.bfloat16, "CUDA compute capability >= 8.0: native bf16 tensor cores")
    fp32_s, bf16_s = _probe_matmul_seconds(device)
    ms = dict(fp32_ms=fp32_s * 1e3, bf16_ms=bf16_s * 1e3 if math.isfinite(bf16_s) else None)
    if bf16_s <= _BF16_MAX_TIME_RATIO * fp32_s:
        return DtypeChoice(torch.bfloat16, f"measured: bf16 matmul {fp32_s / bf16_s:.1f}x faster than fp32", **ms)
    if not math.isfinite(bf16_s):
        return DtypeChoice(torch.float32, "bf16 matmul unavailable on this device", **ms)
    return DtypeChoice(torch.float32, f"measured: bf16 matmul not faster than fp32 (time ratio {bf16_s / fp32_s:.2f})", **ms)


def _cuda_native_bf16(device: torch.device) -> bool:
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _synchronize(device: torch.device) -> None:
    backend = getattr(torch, device.type, None)
    sync = getattr(backend, "synchronize", None)
    if device.type != "cpu" and callable(sync):
        sync()


def _probe_matmul_seconds(device: torch.device) -> tuple[float, float]:
    """Best time of a _PROBE_SIZE² matmul in (fp32, bf16) on ``device``; bf16 is inf if it fails.

    Interleaved rounds after one warm-up each (3, up to 10 while the ratio is within 4x either way);
    a private generator leaves the global RNG alone.
    """
    n = _PROBE_SIZE
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(2, n, n, generator=gen)
    times: dict[torch.dtype, float] = {torch.float32: math.inf, torch.bfloat16: math.inf}
    with torch.no_grad():
        mats = {}
        for dt in (torch.float32, torch.bfloat16):
            try:
                a, b = base.to(device=device, dtype=dt).unbind(0)
                torch.mm(a, b)  # warm-up (kernel selection, first-touch)
                _synchronize(device)
                mats[dt] = (a, b)
            except (RuntimeError, TypeError, NotImplementedError):
                if dt == torch.float32:
                    raise
        rounds = 0
        while rounds < _PROBE_MAX_ROUNDS:
            for dt, (a, b) in mats.items():
                t0 = time.perf_counter()
                torch.mm(a, b)
                _synchronize(device)
                times[dt] = min(times[dt], time.perf_counter() - t0)
            rounds += 1
            ratio = times[torch.bfloat16] / times[torch.float32]
            # clear after a few rounds; a ratio near the threshold (or a noisy, shared machine)
            # gets more rounds, since the minimum of more samples is closer to the true time
            if rounds >= _PROBE_ROUNDS and not (0.25 < ratio < 4.0):
                break
            if ratio > 16.0:  # bf16 far slower (no bf16 units): stop paying for it
                break
    return times[torch.float32], times[torch.bfloat16]


def check_matrix(G: torch.Tensor, name: str = "G") -> None:
    """Raise a clear error unless G is a real floating tensor of shape (..., m, n)."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(G).__name__}")
    if G.ndim < 2:
        raise ValueError(
            f"{name} must have shape (..., m, n) with at least 2 dims, got shape {tuple(G.shape)}"
        )
    if G.is_complex():
        raise TypeError(f"{name} is complex (dtype {G.dtype}, shape {tuple(G.shape)}); only real tensors are supported")
    if not G.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {G.dtype} with shape {tuple(G.shape)}")


def _check_finite(G: torch.Tensor, name: str) -> None:
    # max and min propagate NaN and reach ±inf, so two read-only reductions decide (several times
    # cheaper than isfinite(G).all(), which writes a boolean tensor); the count is for the message
    if bool(torch.isfinite(G.amax()) & torch.isfinite(G.amin())):
        return
    bad = int((~torch.isfinite(G)).sum())
    raise ValueError(
        f"{name} of shape {tuple(G.shape)} has {bad} non-finite (NaN/inf) entries; "
        "pass nonfinite='propagate' to return NaN instead of raising"
    )


def normalize_frobenius(X: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale each matrix of X to Frobenius norm ~1 without overflow or underflow.

    Dividing by the largest |entry| first keeps every entry in [-1, 1], so the norm that follows
    is in [1, sqrt(mn)] and can neither overflow (for inputs up to the dtype's max) nor
    underflow (down to subnormals). A zero matrix stays zero. Since σ_max ≤ ‖X‖_F, the result has
    spectral norm ≤ 1, which the Newton-Schulz polynomials need.
    """
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    X = X / torch.where(amax > 0, amax, torch.ones_like(amax))
    norm = torch.linalg.matrix_norm(X, ord="fro", keepdim=True)
    # a zero matrix (norm 0) stays zero, also with eps=0 (the SVD methods), instead of 0/0 = NaN
    return X / torch.where(norm > 0, norm + eps, torch.ones_like(norm))


def _as_batch(X: torch.Tensor) -> torch.Tensor:
    return X.reshape(-1, X.shape[-2], X.shape[-1])


# "auto" picks "gram" where its FLOP count is at most 0.8 of Newton-Schulz's and the matrices are
# large enough for FLOPs to dominate. Measured on a 2-core CPU, 1 thread, Keller x5 (shared machine,
# so +-10%): fp32 gram/NS time 0.62-0.67 at 768x3072 and 768x2304, 0.72 at 128x512, 0.92 at
# 512x1024, 1.00 at 384x768, but 1.34 at 96x256 (more, smaller kernels) and 1.91 on 16 stacked
# 96x96; bf16 (restarts every 2 steps) 0.78-0.87 at 768x3072 / 3072x768 (FLOP ratio 0.78), 0.84
# at 384x1536, 0.90-0.95 at n = 3m (FLOP ratio 0.83), 0.94 at 192x768.
_GRAM_MAX_COST_RATIO = 0.8
_GRAM_MIN_SIDE = 128
# In bf16/fp16 the Gram form's accumulated product drifts (spurious negative eigenvalues of A,
# eigenvector drift: Zhang, Amsel, Chen, Dao, "Gram Newton-Schulz", 2026) and, without restarts,
# blows up on real gradients. Restarting from X <- P X_0 every 2 steps kept every preset (keller
# x5, polar_express x5/x8, you x5/x6) within +0.005 of Newton-Schulz's bf16 distance from U Vᵀ on
# real momenta of the lab GPT (192x768, 384x1024, ...), Gaussian and power-law matrices. Every 3
# steps is ~10% faster and as good for Keller's coefficients, but blew up with Polar Express.
_GRAM_RESTART_EVERY = 2


def gram_restarts(steps: int, dtype: torch.dtype) -> tuple[int, ...]:
    """Steps (0-based) before which the Gram iteration restarts from X <- P X_0.

    None in fp32/fp64 (stable without); every 2 steps in bf16/fp16.

    >>> import torch
    >>> gram_restarts(5, torch.bfloat16), gram_restarts(8, torch.bfloat16), gram_restarts(5, torch.float32)
    ((2, 4), (2, 4, 6), ())
    """
    if dtype in (torch.float32, torch.float64):
        return ()
    return tuple(range(_GRAM_RESTART_EVERY, steps, _GRAM_RESTART_EVERY))


def flops(method: str, m: int, n: int, steps: int, restarts: Sequence[int] = ()) -> float:
    """Multiply-add FLOPs of one m x n (m <= n) orthogonalization by a polynomial method.

    ``"newton_schulz"``: per step X Xᵀ (2m²n), A² (2m³) and B X (2m²n).
    ``"gram"``: per segment between restarts (a segment of L steps): X₀X₀ᵀ and the final P X₀
    (4m²n) plus A² every step, Q P every step but the first and P A₀ Pᵀ every step but the last
    ((8L − 6) m³). Without restarts: 4m²n + (8k − 6)m³.
    """
    m, n = min(m, n), max(m, n)
    if method == "gram":
        cuts = [0, *sorted(r for r in set(restarts) if 0 < r < steps), steps]
        lengths = [b - a for a, b in zip(cuts, cuts[1:])]
        return sum(4.0 * m * m * n + (8.0 * L - 6.0) * m**3 for L in lengths)
    return steps * (4.0 * m * m * n + 2.0 * m**3)


def choose_method(m: int, n: int, steps: int, dtype: torch.dtype) -> str:
    """The method ``"auto"`` runs for an m x n matrix: ``"gram"`` or ``"newton_schulz"``.

    ``"gram"`` where it needs at most 0.8 of Newton-Schulz's FLOPs (with the restarts that
    :func:`gram_restarts` gives a bf16/fp16 iteration: n >= ~2.2m in fp32, n >= ~3.6m in bf16) and
    the short side is at least 128. Both run the same polynomial, so the choice changes only
    rounding.

    Example:
        >>> import torch
        >>> from muonlab.orthogonalize import choose_method
        >>> choose_method(768, 3072, 5, torch.float32), choose_method(768, 768, 5, torch.float32)
        ('gram', 'newton_schulz')
    """
    short = min(m, n)
    if short < _GRAM_MIN_SIDE:
        return "newton_schulz"
    ratio = flops("gram", m, n, steps, gram_restarts(steps, dtype)) / flops("newton_schulz", m, n, steps)
    return "gram" if ratio <= _GRAM_MAX_COST_RATIO else "newton_schulz"


def method_flops(method: str, m: int, n: int, steps: int, dtype: torch.dtype) -> float:
    """FLOPs of one m x n orthogonalization as :func:`orthogonalize` runs it: ``"auto"`` resolved
    by :func:`choose_method` and the Gram form with the restarts of ``dtype`` (for cost models such
    as the distributed step's owner balance).

    >>> import torch
    >>> method_flops("auto", 768, 3072, 5, torch.bfloat16) == flops("gram", 768, 3072, 5, (2, 4))
    True
    """
    if method == "auto":
        method = choose_method(m, n, steps, dtype)
    restarts = gram_restarts(steps, dtype) if method == "gram" else ()
    return flops(method, m, n, steps, restarts)


def _prescale(X: torch.Tensor, work_dtype: torch.dtype, eps: float) -> torch.Tensor:
    """X (B, m, n) divided by its largest |entry| per matrix, in ``work_dtype``.

    Entries end in [-1, 1], so X Xᵀ and (X Xᵀ)² can neither overflow nor underflow in fp32/bf16
    accumulation (inputs from subnormals to the fp32 maximum), and a nonzero matrix has Frobenius
    norm >= 1. The Frobenius normalisation itself is folded into the first iteration step (see
    :func:`newton_schulz`), which saves passes over the m x n matrix. NaN/inf entries make the
    matrix NaN. fp16 has too small a range for the unnormalised A²: it gets the full
    :func:`normalize_frobenius` first.
    """
    if work_dtype == torch.float16:
        wide = torch.float64 if X.dtype == torch.float64 else torch.float32
        return normalize_frobenius(X.to(wide), eps=eps).to(work_dtype, memory_format=torch.contiguous_format)
    # a division (not a product with 1/amax, which overflows for subnormal amax); the result is
    # laid out contiguously: a transposed (tall) input would otherwise keep its strides through the
    # elementwise ops, and every product of the iteration would copy its operands (measured: 45% of
    # the time of a 3072x768 bf16 orthogonalization on CPU)
    if torch.compiler.is_compiling():  # inductor fuses the division and the cast by itself
        return (X / _max_entry(X)).to(work_dtype, memory_format=torch.contiguous_format)
    # eagerly the division writes the narrow, contiguous result directly: one pass, no fp32 temporary
    return torch.div(X, _max_entry(X), out=torch.empty(X.shape, dtype=work_dtype, device=X.device))


def min_max(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of all of ``t``'s entries, NaN propagating, by the fastest reduction for its layout.

    Measured on CPU (torch 2.13): one ``aminmax`` pass is 1.2-2.3x faster than ``amin`` and ``amax``
    in fp32 and 3.6x in bf16 on contiguous input, but 20x slower on a transposed view, so a
    transposed matrix is reduced as its contiguous transpose and any other layout by the pair."""
    W = t.mT if t.dim() >= 2 and t.stride(-1) != 1 and t.stride(-2) == 1 else t
    if W.is_contiguous() and t.numel() > 0:
        lo, hi = torch.aminmax(W)
        return lo, hi
    return t.amin(), t.amax()


def _max_entry(X: torch.Tensor) -> torch.Tensor:
    """max |entry| of each matrix of X (B, m, n) as (B, 1, 1), 1 for a zero matrix; NaN propagates."""
    # max(max, -min), no |X| temporary (2x faster than abs().amax). A batch keeps amax and amin along
    # the matrix dimensions: aminmax along a dimension is 4x slower than them (CPU, torch 2.13)
    if X.shape[:-2].numel() == 1 and X.numel() > 0:
        lo, hi = min_max(X)
        amax = torch.maximum(hi, -lo).reshape((1,) * X.dim())
    else:
        amax = torch.maximum(X.amax(dim=(-2, -1), keepdim=True), -X.amin(dim=(-2, -1), keepdim=True))
    return torch.where(amax > 0, amax, torch.ones_like(amax))


def prescale_stack(sources: Sequence[torch.Tensor], work_dtype: torch.dtype,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What the polynomial methods first make of ``torch.cat(sources)`` (each matrix divided by its
    largest |entry|, in ``work_dtype``, contiguous), without forming the concatenation: each source
    (k, m, n) is divided straight into its slice of the stack. Pass the result to
    :func:`orthogonalize_raw` with ``prescaled=True``. Not for fp16 (which normalizes differently).
    ``out``: memory to write the stack into (a contiguous ``work_dtype`` tensor of as many elements)."""
    if work_dtype == torch.float16:
        raise ValueError("prescale_stack: fp16 iterations normalize by the Frobenius norm first; use orthogonalize_raw")
    shape = (sum(s.shape[0] for s in sources), *sources[0].shape[-2:])
    if out is None:
        out = torch.empty(shape, dtype=work_dtype, device=sources[0].device)
    elif out.dtype != work_dtype or out.numel() != math.prod(shape) or not out.is_contiguous():
        raise ValueError(f"prescale_stack: out must be a contiguous {work_dtype} tensor of {math.prod(shape)} elements, "
                         f"got {out.dtype} with shape {tuple(out.shape)}")
    else:
        out = out.view(shape)
    # the extremes of every matrix first (one pass each), then max |entry| for all of them at once:
    # per source only the reduction and the division remain (small matrices are op-bound on a CPU)
    lows, highs = [], []
    for s in sources:
        lo, hi = min_max(s) if s.shape[0] == 1 else (s.amin(dim=(-2, -1)), s.amax(dim=(-2, -1)))
        lows.append(lo.reshape(-1))
        highs.append(hi.reshape(-1))
    amax = torch.maximum(torch.cat(highs), torch.cat(lows).neg_()) if len(sources) > 1 else \
        torch.maximum(highs[0], lows[0].neg())
    amax = torch.where(amax > 0, amax, 1.0).view(-1, 1, 1)  # 1 for a zero matrix; NaN propagates
    offset = 0
    for s in sources:
        k = s.shape[0]
        torch.div(s, amax[offset:offset + k], out=out[offset:offset + k])
        offset += k
    return out


def _inverse_norm(A: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / (‖X‖_F + eps) per matrix from A = X Xᵀ (‖X‖_F² = tr A), shape (B, 1, 1), in fp32/fp64."""
    wide = torch.float64 if A.dtype == torch.float64 else torch.float32
    norm = A.diagonal(dim1=-2, dim2=-1).to(wide).sum(-1).clamp_min(0).sqrt() + eps
    # a zero matrix (norm 0, also with eps = 0) has A = 0: any finite factor keeps it zero
    return torch.where(norm > 0, 1.0 / norm, torch.ones_like(norm)).reshape(-1, 1, 1)


def newton_schulz(X: torch.Tensor, schedule: Sequence[Triple], eps: float = 1e-7, tall: bool = False) -> torch.Tensor:
    """Run the odd-polynomial iteration on a batch X of shape (B, m, n), m <= n.

    One step: A = X Xᵀ; B = b A + c A²; X = a X + B X (the quintic form from seed 000 evaluated
    with two m x m products and one m x n product). c = 0 (cubic) skips A².

    X may have any scale: the normalisation X / (‖X‖_F + eps) is folded into the first step. With
    s = ‖X‖_F + eps = sqrt(tr A) + eps, step 1 on X / s is X₁ = ((a/s) I + (b/s³) A + (c/s⁵) A²) X,
    so only m x m matrices are scaled, and no pass over X is spent on normalising it.

    ``tall=True``: X is (B, n, m), n >= m, and the same iteration runs on its transpose without
    forming it: A = XᵀX, X <- a X + X B (B is symmetric). A transposing copy of X costs as much as
    several of the products on a CPU, so tall matrices are never transposed.
    """
    for i, (a, b, c) in enumerate(schedule):
        A = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)
        if i == 0:
            inv = _inverse_norm(A, eps)
            dt = X.dtype
            # c/s⁵ A² + b/s³ A in one fused product: A @ (A c/s⁵) + A b/s³
            B = A * (b * inv**3).to(dt)
            if c != 0.0:
                B = torch.baddbmm(B, A, A * (c * inv**5).to(dt))
            B.diagonal(dim1=-2, dim2=-1).add_((a * inv).reshape(-1, 1).to(dt))
            X = torch.bmm(X, B) if tall else torch.bmm(B, X)
            continue
        if c != 0.0:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        else:
            B = A * b
        X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
    return X


def newton_schulz_gram(
    X: torch.Tensor, schedule: Sequence[Triple], eps: float = 1e-7, restarts: Sequence[int] = (), tall: bool = False
) -> torch.Tensor:
    """The same polynomial iteration as :func:`newton_schulz`, carried out on Gram matrices.

    With X_k = P_k X_0 and A_k = X_k X_kᵀ, one step is Q = aI + b A + c A²; P <- Q P;
    A <- P A_0 Pᵀ (Q is a polynomial in A, so it commutes with A and is symmetric). Only m x m
    products inside the loop; X_0 is touched twice (A_0 = X_0 X_0ᵀ and the final P X_0).
    Rebuilding A from the accumulated P and A_0 (rather than A <- Q A Q) keeps A consistent with
    P, which halves the fp32 rounding drift on ill-conditioned inputs at the same cost. The last
    step needs no new A.

    ``restarts``: steps (0-based) before which X <- P X_0 is formed and the iteration starts
    again from its Gram matrix (what keeps bf16 stable, see :func:`gram_restarts`).
    X may have any scale: 1/‖X‖_F is applied to A_0 and folded into P. ``tall``: as in
    :func:`newton_schulz` (X <- X Pᵀ instead of P X).
    Cost in flops: :func:`flops` (``"gram"``); a win when n is several times m.
    """

    def gram(X: torch.Tensor) -> torch.Tensor:
        return torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)

    def apply(P: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return torch.bmm(X, P.mT) if tall else torch.bmm(P, X)

    last = len(schedule) - 1
    A0 = gram(X)
    inv: Optional[torch.Tensor] = _inverse_norm(A0, eps)  # the scale still owed to X
    wide = inv.dtype
    A0 = (A0.to(wide) * inv * inv).to(X.dtype)
    A = A0
    P: Optional[torch.Tensor] = None
    for i, (a, b, c) in enumerate(schedule):
        if i in restarts and P is not None:
            if inv is not None:
                P, inv = (P.to(wide) * inv).to(X.dtype), None
            X = apply(P, X)
            A0 = A = gram(X)
            P = None
        if c != 0.0:
            Q = torch.baddbmm(A, A, A, beta=b, alpha=c)
        else:
            Q = A * b
        Q.diagonal(dim1=-2, dim2=-1).add_(a)
        P = Q if P is None else torch.bmm(Q, P)
        if i < last and (i + 1) not in restarts:
            A = torch.bmm(torch.bmm(P, A0), P.mT)
            A = 0.5 * (A + A.mT)  # keep it symmetric against rounding drift
    assert P is not None
    if inv is not None:
        P = (P.to(wide) * inv).to(X.dtype)
    return apply(P, X)


def inverse_sqrt_coupled(X: torch.Tensor, steps: int, eps: float, tall: bool = False) -> torch.Tensor:
    """msign(X) ≈ (X Xᵀ + eps I)^(-1/2) X with the coupled Newton-Schulz iteration (seed 002).

    Y_0 = A / tr(A), Z_0 = I;  T = (3I − Z Y) / 2;  Y <- Y T;  Z <- T Z.  Then
    Z -> (A / tr A)^(-1/2), so A^(-1/2) ≈ Z / sqrt(tr A). Converges for eigenvalues of
    A / tr(A) in (0, 1], quadratically near 1 but only by a factor ~1.5 per step for tiny ones.
    ``tall``: X is (B, n, m) with n >= m and the result is X Zᵀ / sqrt(tr A) for A = XᵀX.
    """
    m = X.shape[-1] if tall else X.shape[-2]
    eye = torch.eye(m, dtype=X.dtype, device=X.device).expand(X.shape[0], m, m)
    A = (torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)) + eps * eye
    trace = A.diagonal(dim1=-2, dim2=-1).sum(-1).reshape(-1, 1, 1)
    Y = A / trace
    Z = eye.clone()
    for _ in range(steps):
        T = 0.5 * (3.0 * eye - torch.bmm(Z, Y))
        Y = torch.bmm(Y, T)
        Z = torch.bmm(T, Z)
    return (torch.bmm(X, Z.mT) if tall else torch.bmm(Z, X)) / trace.sqrt()


def _svd_polar(X: torch.Tensor) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    tol = S.amax(dim=-1, keepdim=True) * max(X.shape[-2:]) * torch.finfo(X.dtype).eps
    keep = (S > tol).to(X.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


def _svd_inv_sqrt(X: torch.Tensor) -> torch.Tensor:
    # X is (B, m, n) with m <= n: msign(X) = (X Xᵀ)^(-1/2) X (the seed's form, on the short side).
    A = X @ X.mT
    evals, evecs = torch.linalg.eigh(A)
    # The eigenvalues are σ², resolved by eigh only to ~eps·λ_max (noise floor measured ≤ 2.5 eps·λ_max
    # on rank-deficient fp32 inputs), so a small multiple of eps·λ_max is the null threshold. The
    # former max(m, n)·eps·λ_max dropped every σ below ~1e-2·σ_max in fp32 (e.g. 80% error on a
    # 256x1024 matrix with σ_k = 1/k).
    tol = evals.amax(dim=-1, keepdim=True).clamp_min(0) * 8 * torch.finfo(X.dtype).eps
    kept = evals > tol
    inv_sqrt = torch.where(kept, torch.where(kept, evals, torch.ones_like(evals)).rsqrt(), torch.zeros_like(evals))
    return (evecs * inv_sqrt.unsqueeze(-2)) @ evecs.mT @ X


def _polynomial(
    X: torch.Tensor,
    method: str,
    schedule: tuple[Triple, ...],
    steps: int,
    eps: float,
    norm_dtype: torch.dtype,
    work_dtype: torch.dtype,
    tall: bool = False,
    prescaled: bool = False,
) -> torch.Tensor:
    """Normalize a batch X (B, m, n) and run one polynomial method on its short side
    (``tall``: m > n, iterated on XᵀX without transposing X). ``prescaled``: X is already
    :func:`prescale_stack`'s output."""
    if method == "newton_schulz":
        return newton_schulz(X if prescaled else _prescale(X, work_dtype, eps), schedule, eps, tall)
    if method == "gram":
        restarts = gram_restarts(len(schedule), work_dtype)
        return newton_schulz_gram(X if prescaled else _prescale(X, work_dtype, eps), schedule, eps, restarts, tall)
    X = normalize_frobenius(X.to(norm_dtype), eps=eps).to(work_dtype, memory_format=torch.contiguous_format)
    return inverse_sqrt_coupled(X, steps, eps, tall)


_COMPILED: dict[str, object] = {}
# One graph per (method, schedule, dtypes, batch of one or more): a model with several optimizer
# groups can need more than torch's default of 8 per function, after which torch would quietly
# fall back to eager; the limit is raised for these calls only.
_RECOMPILE_LIMIT = 64


def _run_compiled(X: torch.Tensor, *args: object) -> torch.Tensor:
    """``_polynomial`` through ``torch.compile`` (created once, on first use).

    Dynamic shapes: one graph serves every matrix shape of a model instead of one compilation per
    shape. X is made contiguous so that transposed views (tall blocks) reuse the same graph.
    """
    fn = _COMPILED.get("polynomial")
    if fn is None:
        fn = _COMPILED["polynomial"] = torch.compile(_polynomial, dynamic=True)
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        return fn(X.contiguous(), *args)  # type: ignore[operator]


@torch.no_grad()
def orthogonalize(
    G: torch.Tensor,
    method: Method = "newton_schulz",
    coefficients: CoefficientSpec = "keller",
    steps: int = 5,
    dtype: "torch.dtype | str | None" = None,
    *,
    eps: float = 1e-7,
    nonfinite: NonFinitePolicy = "raise",
    compile: bool = False,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Approximate msign(G) = U Vᵀ for one matrix or a batch of shape (..., m, n).

    Args:
        G: real tensor with at least two dimensions; leading dimensions are a batch.
        method: one of ``"newton_schulz"`` (default), ``"gram"``, ``"inverse_sqrt"``,
            ``"svd"`` (exact), ``"svd_inv_sqrt"`` (exact, the seed's G(GᵀG)^(-1/2) form) or
            ``"auto"`` (``"gram"`` or ``"newton_schulz"`` by shape and dtype, see
            :func:`choose_method`).
        coefficients: for the polynomial methods, a preset name (``"keller"``, ``"taylor"``,
            ``"cubic"``, ``"you"``, ``"polar_express"``), one ``(a, b, c)`` or a list of them.
        steps: number of iterations (ignored by the SVD methods).
        dtype: iteration dtype (bf16, fp16, fp32, fp64 or their names). ``None``: fp64 for fp64
            input, else the device's :func:`default_dtype` (``$MUONLAB_NS_DTYPE`` or a one-time
            measurement: bf16 where bf16 matmuls are clearly faster, as on CUDA GPUs and CPUs with
            AMX/AVX512-BF16; fp32 elsewhere). The result has G's dtype.
        eps: added to the Frobenius norm before dividing (``"inverse_sqrt"``: ridge on the Gram).
        nonfinite: ``"raise"`` (default) raises ValueError on NaN/inf input; ``"propagate"``
            skips the check (the result is then NaN where the input was not finite).
        compile: run the polynomial methods (normalization and iteration) through
            ``torch.compile`` (one graph with dynamic shapes, compiled on first use per method,
            schedule and dtype). The numbers equal the eager ones up to rounding; the SVD methods
            always run eagerly. The first call pays the compilation (~20 s on a 2-core CPU).
        out: a floating tensor of G's shape (any dtype, layout or view) to write the result
            into; the cast from the iteration dtype and the copy are then one pass, instead of a
            cast here and a copy by the caller. ``out`` may be G itself. Returns ``out``.

    Returns:
        A tensor of G's shape and dtype, contiguous (or, when G is a transposed view, in G's
        transposed layout). A zero matrix maps to zero; empty matrices to empty.

    Example:
        >>> import torch
        >>> from muonlab import orthogonalize
        >>> G = torch.randn(64, 256)
        >>> O = orthogonalize(G, coefficients="polar_express", steps=8)
        >>> s = torch.linalg.svdvals(O)
        >>> bool((s > 0.9).all() and (s < 1.1).all())
        True
    """
    check_matrix(G)
    if out is not None:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.shape != G.shape:
            raise ValueError(
                f"out must be a floating tensor of G's shape {tuple(G.shape)}, got "
                + (f"shape {tuple(out.shape)} and dtype {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__)
            )
    if method not in METHODS:
        raise ValueError(f"unknown orthogonalization method {method!r}; valid methods: {list(METHODS)}")
    if nonfinite not in ("raise", "propagate"):
        raise ValueError(f"nonfinite must be 'raise' or 'propagate', got {nonfinite!r}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if not (eps >= 0.0):
        raise ValueError(f"eps must be >= 0, got {eps}")
    schedule: list[Triple] = []
    if method in POLYNOMIAL_METHODS:
        schedule = resolve_schedule(coefficients, steps)
    elif method == "inverse_sqrt" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    work_dtype = resolve_dtype(dtype, G.device, G.dtype)
    if G.numel() == 0:
        return out.zero_() if out is not None else torch.zeros_like(G)
    if nonfinite == "raise":
        _check_finite(G, "G")
    result = orthogonalize_raw(G, method, schedule, steps, work_dtype, eps, compile)
    if out is not None:
        return out.copy_(result)
    return result.to(G.dtype)


def orthogonalize_raw(
    G: torch.Tensor, method: str, schedule: Sequence[Triple], steps: int, work_dtype: torch.dtype, eps: float,
    compile: bool = False, prescaled: bool = False,
) -> torch.Tensor:
    """:func:`orthogonalize` without its checks and without the final cast: a non-empty G (already
    validated), a resolved schedule and iteration dtype. The result has G's shape, in the iteration
    dtype (fp32/fp64 for the SVD methods), contiguous or, for a transposed G, in G's transposed layout.
    The optimizer calls this and casts while it writes the result where it goes (one pass, not two).
    ``prescaled``: G is :func:`prescale_stack`'s output (polynomial methods, eager only)."""
    m, n = G.shape[-2], G.shape[-1]
    if method == "auto":
        method = choose_method(m, n, len(schedule), work_dtype)  # type: ignore[assignment]
    if prescaled and (method not in ("newton_schulz", "gram") or compile):
        raise ValueError(f"prescaled input is for the eager polynomial methods, not {method!r} (compile={compile})")
    X = _as_batch(G)
    # Work in the orientation G is stored in: a transposed view (e.g. Wᵀ of a contiguous W) is
    # iterated as its contiguous transpose, and the result comes back in G's layout. A transposing
    # copy costs as much as several of the iteration's products on a CPU.
    flip = X.stride(-1) != 1 and X.stride(-2) == 1
    W = X.mT if flip else X
    tall = W.shape[-2] > W.shape[-1]

    if method in ("svd", "svd_inv_sqrt"):
        Xw = W.mT if tall else W  # the exact methods work on the short side, m <= n
        exact_dtype = torch.float64 if work_dtype == torch.float64 or G.dtype == torch.float64 else torch.float32
        Xw = normalize_frobenius(Xw.to(exact_dtype), eps=0.0)
        # torch.linalg.svd raises on NaN/inf (possible under nonfinite="propagate"): decompose zeros
        # there and return NaN for them
        bad = ~torch.isfinite(Xw).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
        Xw = torch.where(bad, torch.zeros_like(Xw), Xw)
        result = _svd_polar(Xw) if method == "svd" else _svd_inv_sqrt(Xw)
        result = torch.where(bad, torch.full_like(result, float("nan")), result)
        result = (result.mT if tall else result).contiguous()
    else:
        # normalise in at least fp32 (the scale step must not overflow), then iterate in work_dtype
        norm_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
        args = (method, tuple(schedule), steps, eps, norm_dtype, work_dtype, tall)
        result = _run_compiled(W, *args) if compile else _polynomial(W, *args, prescaled=prescaled)

    # result is W-shaped and contiguous; a flipped input gets the flipped (transposed) layout back
    return (result.mT if flip else result).reshape(G.shape)
