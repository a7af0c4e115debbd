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
  the accumulated polynomial is applied to G once at the end (fewer FLOPs when m << n).
* ``"inverse_sqrt"``: the coupled Newton-Schulz iteration for (GGᵀ + eps I)^(-1/2) of seed 002.
* ``"auto"``: ``"gram"`` where it needs at most 3/4 of ``"newton_schulz"``'s FLOPs (n >= ~2.8m
  for 5 steps), the short side is at least 128 and the iteration runs in fp32/fp64;
  ``"newton_schulz"`` otherwise (see :func:`choose_method`). Both run the same polynomial, so the
  choice changes only rounding.

Inputs of shape (..., m, n) are batches of matrices. Tall matrices are transposed so that the
work is always done on the short side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional

import torch

from .coefficients import CoefficientSpec, Triple, resolve_schedule

METHODS = ("newton_schulz", "gram", "inverse_sqrt", "svd", "svd_inv_sqrt", "auto")
Method = Literal["newton_schulz", "gram", "inverse_sqrt", "svd", "svd_inv_sqrt", "auto"]
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


def resolve_dtype(dtype: "torch.dtype | str | None", device: torch.device, input_dtype: torch.dtype) -> torch.dtype:
    """The iteration dtype. ``None`` means: bf16 on CUDA (tensor cores), fp32 elsewhere.

    On CPU, bf16 matmuls are far slower than fp32 (measured on this project's 2-core CPU: 512²
    fp32 matmul 2.6 ms vs bf16 214 ms), so fp32 is the CPU default. float64 input keeps float64.
    """
    if dtype is None:
        if input_dtype == torch.float64:
            return torch.float64
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.lower()
        if key not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(set(_DTYPE_NAMES))}")
        return _DTYPE_NAMES[key]
    if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        return dtype
    raise ValueError(f"unsupported iteration dtype {dtype!r}; use bf16, fp16, fp32 or fp64")


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
    finite = torch.isfinite(G)
    if not bool(finite.all()):
        bad = int((~finite).sum())
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


# "auto" picks "gram" only where it saves at least a quarter of the FLOPs and the matrices are
# large enough for FLOPs to dominate: measured on a 2-core CPU (fp32, Keller x5), gram/NS time was
# 0.62-0.67 at 768x3072 and 768x2304, 0.72 at 128x512, 0.92 at 512x1024, 1.00 at 384x768, but 1.34 at
# 96x256 (more, smaller kernels) and 1.91 on 16 stacked 96x96.
_GRAM_MAX_COST_RATIO = 0.75
_GRAM_MIN_SIDE = 128


def flops(method: str, m: int, n: int, steps: int) -> float:
    """Multiply-add FLOPs of one m x n (m <= n) orthogonalization by a polynomial method.

    ``"newton_schulz"``: per step X Xᵀ (2m²n), A² (2m³) and B X (2m²n).
    ``"gram"``: X₀X₀ᵀ and the final P X₀ (4m²n) plus, per step, A², Q P and P A₀ Pᵀ (8m³, the
    first Q P is free).
    """
    m, n = min(m, n), max(m, n)
    if method == "gram":
        return 4.0 * m * m * n + (8.0 * steps - 2.0) * m**3
    return steps * (4.0 * m * m * n + 2.0 * m**3)


def choose_method(m: int, n: int, steps: int, dtype: torch.dtype) -> str:
    """The method ``"auto"`` runs for an m x n matrix: ``"gram"`` or ``"newton_schulz"``.

    Gram iteration accumulates its polynomial in a product of m x m factors, which in bf16/fp16
    loses the small singular directions, so it is chosen only for fp32/fp64 iteration.

    Example:
        >>> import torch
        >>> from muonlab.orthogonalize import choose_method
        >>> choose_method(768, 3072, 5, torch.float32), choose_method(768, 768, 5, torch.float32)
        ('gram', 'newton_schulz')
    """
    short = min(m, n)
    if dtype not in (torch.float32, torch.float64) or short < _GRAM_MIN_SIDE:
        return "newton_schulz"
    ratio = flops("gram", m, n, steps) / flops("newton_schulz", m, n, steps)
    return "gram" if ratio <= _GRAM_MAX_COST_RATIO else "newton_schulz"


def newton_schulz(X: torch.Tensor, schedule: Sequence[Triple]) -> torch.Tensor:
    """Run the odd-polynomial iteration on a batch X of shape (B, m, n), m <= n, σ_max <= 1.

    One step: A = X Xᵀ; B = b A + c A²; X = a X + B X (the quintic form from seed 000 evaluated
    with two m x m products and one m x n product). c = 0 (cubic) skips A².
    """
    for a, b, c in schedule:
        A = torch.bmm(X, X.mT)
        if c != 0.0:
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        else:
            B = A * b
        X = torch.baddbmm(X, B, X, beta=a)
    return X


def newton_schulz_gram(X: torch.Tensor, schedule: Sequence[Triple]) -> torch.Tensor:
    """The same polynomial iteration as :func:`newton_schulz`, carried out on Gram matrices.

    With X_k = P_k X_0 and A_k = X_k X_kᵀ, one step is Q = aI + b A + c A²; P <- Q P;
    A <- P A_0 Pᵀ (Q is a polynomial in A, so it commutes with A and is symmetric). Only m x m
    products inside the loop; X_0 is touched twice (A_0 = X_0 X_0ᵀ and the final P X_0).
    Rebuilding A from the accumulated P and A_0 (rather than A <- Q A Q) keeps A consistent with
    P, which halves the fp32 rounding drift on ill-conditioned inputs at the same cost.
    Cost in flops: 4 m² n + (8k − 2) m³ instead of k (4 m² n + 2 m³): a win when n is several
    times m (measured 0.62-0.67x the time of ``newton_schulz`` on 768x3072 and 768x2304).
    """
    m = X.shape[-2]
    eye = torch.eye(m, dtype=X.dtype, device=X.device).expand(X.shape[0], m, m)
    A0 = torch.bmm(X, X.mT)
    A = A0
    P: Optional[torch.Tensor] = None
    for a, b, c in schedule:
        if c != 0.0:
            Q = torch.baddbmm(A, A, A, beta=b, alpha=c)
        else:
            Q = A * b
        Q = Q + a * eye
        P = Q if P is None else torch.bmm(Q, P)
        A = torch.bmm(torch.bmm(P, A0), P.mT)
        A = 0.5 * (A + A.mT)  # keep it symmetric against rounding drift
    assert P is not None
    return torch.bmm(P, X)


def inverse_sqrt_coupled(X: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """msign(X) ≈ (X Xᵀ + eps I)^(-1/2) X with the coupled Newton-Schulz iteration (seed 002).

    Y_0 = A / tr(A), Z_0 = I;  T = (3I − Z Y) / 2;  Y <- Y T;  Z <- T Z.  Then
    Z -> (A / tr A)^(-1/2), so A^(-1/2) ≈ Z / sqrt(tr A). Converges for eigenvalues of
    A / tr(A) in (0, 1], quadratically near 1 but only by a factor ~1.5 per step for tiny ones.
    """
    m = X.shape[-2]
    eye = torch.eye(m, dtype=X.dtype, device=X.device).expand(X.shape[0], m, m)
    A = torch.bmm(X, X.mT) + eps * eye
    trace = A.diagonal(dim1=-2, dim2=-1).sum(-1).reshape(-1, 1, 1)
    Y = A / trace
    Z = eye.clone()
    for _ in range(steps):
        T = 0.5 * (3.0 * eye - torch.bmm(Z, Y))
        Y = torch.bmm(Y, T)
        Z = torch.bmm(T, Z)
    return torch.bmm(Z, X) / trace.sqrt()


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
) -> torch.Tensor:
    """Normalize a batch (B, m, n), m <= n, and run one polynomial method on it."""
    X = normalize_frobenius(X.to(norm_dtype), eps=eps).to(work_dtype)
    if method == "newton_schulz":
        return newton_schulz(X, schedule)
    if method == "gram":
        return newton_schulz_gram(X, schedule)
    return inverse_sqrt_coupled(X, steps, eps)


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
        dtype: iteration dtype (bf16, fp16, fp32, fp64 or their names). ``None``: bf16 on CUDA,
            fp32 on CPU (fp64 for fp64 input). The result has G's dtype.
        eps: added to the Frobenius norm before dividing (``"inverse_sqrt"``: ridge on the Gram).
        nonfinite: ``"raise"`` (default) raises ValueError on NaN/inf input; ``"propagate"``
            skips the check (the result is then NaN where the input was not finite).
        compile: run the polynomial methods (normalization and iteration) through
            ``torch.compile`` (one graph with dynamic shapes, compiled on first use per method,
            schedule and dtype). The numbers equal the eager ones up to rounding; the SVD methods
            always run eagerly. The first call pays the compilation (~20 s on a 2-core CPU).

    Returns:
        A tensor of G's shape and dtype. A zero matrix maps to zero; empty matrices to empty.

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
    if method not in METHODS:
        raise ValueError(f"unknown orthogonalization method {method!r}; valid methods: {list(METHODS)}")
    if nonfinite not in ("raise", "propagate"):
        raise ValueError(f"nonfinite must be 'raise' or 'propagate', got {nonfinite!r}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if not (eps >= 0.0):
        raise ValueError(f"eps must be >= 0, got {eps}")
    schedule: list[Triple] = []
    if method in ("newton_schulz", "gram", "auto"):
        schedule = resolve_schedule(coefficients, steps)
    elif method == "inverse_sqrt" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    work_dtype = resolve_dtype(dtype, G.device, G.dtype)
    if G.numel() == 0:
        return torch.zeros_like(G)
    if nonfinite == "raise":
        _check_finite(G, "G")

    m, n = G.shape[-2], G.shape[-1]
    if method == "auto":
        method = choose_method(m, n, len(schedule), work_dtype)  # type: ignore[assignment]
    transpose = m > n
    X = G.mT if transpose else G
    batch_shape = X.shape
    X = _as_batch(X)

    if method in ("svd", "svd_inv_sqrt"):
        exact_dtype = torch.float64 if work_dtype == torch.float64 or G.dtype == torch.float64 else torch.float32
        X = normalize_frobenius(X.to(exact_dtype), eps=0.0)
        bad = None
        if nonfinite == "propagate":
            # torch.linalg.svd raises on NaN/inf: decompose zeros there and return NaN for them
            bad = ~torch.isfinite(X).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
            X = torch.where(bad, torch.zeros_like(X), X)
        out = _svd_polar(X) if method == "svd" else _svd_inv_sqrt(X)
        if bad is not None:
            out = torch.where(bad, torch.full_like(out, float("nan")), out)
    else:
        # normalise in at least fp32 (the scale step must not overflow), then iterate in work_dtype
        norm_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
        if compile:
            out = _run_compiled(X, method, tuple(schedule), steps, eps, norm_dtype, work_dtype)
        else:
            out = _polynomial(X, method, tuple(schedule), steps, eps, norm_dtype, work_dtype)

    out = out.reshape(batch_shape)
    if transpose:
        out = out.mT
    return out.to(G.dtype).contiguous()
