"""Layer 1: Newton-Schulz coefficient presets and a coefficient fitter.

An odd polynomial step ``X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X`` acts on every singular value
σ of X through the scalar map ``g(σ) = a σ + b σ³ + c σ⁵`` (seed 000). A *schedule* is the
list of ``(a, b, c)`` used at each step; a constant schedule repeats one triple.

Every number below is a published constant; its source is named beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch

Triple = tuple[float, float, float]
CoefficientSpec = Union[str, Sequence[float], Sequence[Sequence[float]]]

# Keller Jordan's Muon quintic, tuned to maximise the slope at 0 while keeping the 5-step map
# inside roughly [0.7, 1.2] (K. Jordan, "Muon: An optimizer for hidden layers in neural
# networks", 2024; also torch.optim.Muon's default).
KELLER: Triple = (3.4445, -4.7750, 2.0315)

# Second-order Taylor expansion of t^(-1/2) around t = 1: (15 - 10 t + 3 t²) / 8, so
# X <- 15/8 X - 5/4 X(XᵀX) + 3/8 X(XᵀX)² (seed 000, section 三).
TAYLOR: Triple = (15 / 8, -5 / 4, 3 / 8)

# Classical cubic Newton-Schulz X <- 1.5 X - 0.5 X Xᵀ X (seeds 003/004). c = 0 skips the A² term.
CUBIC: Triple = (1.5, -0.5, 0.0)

# Jiacheng You's per-step schedule found by optimisation with a stability loss (J. You, 2025,
# published as six (a, b, c) triples in units of 1/1024, as used in modded-nanogpt and modula).
# The published schedule has six entries; `steps=5` uses the first five, more steps repeat the last.
YOU: tuple[Triple, ...] = (
    (3955 / 1024, -8306 / 1024, 5008 / 1024),
    (3735 / 1024, -6681 / 1024, 3463 / 1024),
    (3799 / 1024, -6499 / 1024, 3211 / 1024),
    (4019 / 1024, -6385 / 1024, 2906 / 1024),
    (2677 / 1024, -3029 / 1024, 1162 / 1024),
    (2172 / 1024, -1833 / 1024, 682 / 1024),
)

# Polar Express, degree 5, lower bound l = 1e-3 (N. Amsel, D. Persson, C. Musco, R. M. Gower,
# "The Polar Express: Optimal Matrix Sign Methods and Their Application to the Muon Algorithm",
# arXiv:2505.16932, Algorithm 1). The paper divides every step but the last by a safety factor
# 1.01 (a/1.01, b/1.01³, c/1.01⁵) for bf16 stability; that is applied below. Its last entry is the
# Taylor step, which further steps repeat.
_POLAR_EXPRESS_RAW: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_PE_SAFETY = 1.01
POLAR_EXPRESS: tuple[Triple, ...] = tuple(
    (a / _PE_SAFETY, b / _PE_SAFETY**3, c / _PE_SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)


@dataclass(frozen=True)
class Preset:
    """A named coefficient schedule with the source it comes from."""

    name: str
    schedule: tuple[Triple, ...]
    source: str
    default_steps: int = 5


PRESETS: dict[str, Preset] = {
    "keller": Preset("keller", (KELLER,), "K. Jordan, Muon (2024); torch.optim.Muon default", 5),
    "taylor": Preset("taylor", (TAYLOR,), "2nd-order Taylor of t^-1/2 (seed 000)", 5),
    "cubic": Preset("cubic", (CUBIC,), "classical cubic Newton-Schulz (seeds 003/004)", 5),
    "you": Preset("you", YOU, "J. You (2025), 6-step schedule with stability loss", 6),
    "polar_express": Preset(
        "polar_express", POLAR_EXPRESS, "Amsel et al., arXiv:2505.16932, Alg. 1 (l=1e-3, safety 1.01)", 5
    ),
}


def _as_triple(values: Sequence[float], where: str) -> Triple:
    try:
        items = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where}: expected three numbers (a, b, c), got {values!r}") from exc
    if len(items) != 3:
        raise ValueError(f"{where}: expected three numbers (a, b, c), got {len(items)}: {values!r}")
    if not all(math.isfinite(v) for v in items):
        raise ValueError(f"{where}: coefficients must be finite, got {values!r}")
    return (items[0], items[1], items[2])


def resolve_schedule(coefficients: CoefficientSpec, steps: int) -> list[Triple]:
    """Turn a preset name, one ``(a, b, c)`` or a list of them into ``steps`` triples.

    Steps beyond the end of a per-step schedule repeat its last entry.

    >>> resolve_schedule("keller", 2)
    [(3.4445, -4.775, 2.0315), (3.4445, -4.775, 2.0315)]
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__} {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(coefficients, str):
        key = coefficients.lower().replace("-", "_")
        if key not in PRESETS:
            raise ValueError(
                f"unknown coefficient preset {coefficients!r}; valid presets: {sorted(PRESETS)}"
            )
        schedule: list[Triple] = list(PRESETS[key].schedule)
    elif isinstance(coefficients, torch.Tensor):
        raise TypeError("coefficients must be a preset name or Python numbers, not a tensor")
    else:
        seq = list(coefficients)
        if not seq:
            raise ValueError("coefficients: empty schedule")
        if all(isinstance(v, (int, float)) for v in seq):
            schedule = [_as_triple(seq, "coefficients")]
        else:
            schedule = [_as_triple(t, f"coefficients[{i}]") for i, t in enumerate(seq)]
    if len(schedule) >= steps:
        return schedule[:steps]
    return schedule + [schedule[-1]] * (steps - len(schedule))


def scalar_map(x: torch.Tensor, schedule: Sequence[Triple]) -> torch.Tensor:
    """Apply the composed polynomial g_k ∘ ... ∘ g_1 to scalars (singular values) x."""
    for a, b, c in schedule:
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x


# --------------------------------------------------------------------------------------------
# Fitting coefficients by gradient descent (seed 000, "Muon 魔法系数").
# --------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """Result of :func:`fit_coefficients`."""

    coefficients: Triple
    steps: int
    shape: tuple[int, int]
    loss: float
    initial_loss: float
    history: list[float] = field(default_factory=list)
    k_x1_x2: Triple = (0.0, 0.0, 0.0)


def _sample_singular_values(
    shape: tuple[int, int], n_matrices: int, generator: torch.Generator
) -> torch.Tensor:
    """Singular values of Gaussian matrices after Frobenius normalisation (what NS sees)."""
    m, n = shape
    out = []
    for _ in range(n_matrices):
        g = torch.randn(m, n, generator=generator, dtype=torch.float64)
        s = torch.linalg.svdvals(g)
        out.append(s / s.norm())
    return torch.cat(out)


def fit_coefficients(
    shape: tuple[int, int] = (1024, 1024),
    steps: int = 5,
    *,
    n_matrices: int = 8,
    iterations: int = 2000,
    lr: float = 0.01,
    init: Triple = (1.5, 0.9, 1.2),
    seed: int = 0,
    progress: bool = True,
) -> FitResult:
    """Fit one quintic (a, b, c), repeated ``steps`` times, that maps singular values to ~1.

    Follows seed 000: the polynomial is parametrised by its fixed points,
    ``g(x) = x + k·x·(x² − x1²)(x² − x2²)``, i.e. ``a = 1 + k·x1²·x2²``, ``b = −k(x1² + x2²)``,
    ``c = k``, and (k, x1, x2) are fitted with Adam so that ``g^(steps)(σ) ≈ 1`` for the
    singular values σ of Frobenius-normalised Gaussian matrices of ``shape``.
    The seed reports about a=3.3, b=-4.1, c=1.7 for 1024x1024 and 5 steps.

    Example:
        >>> r = fit_coefficients((64, 64), 5, iterations=200, progress=False)
        >>> r.loss < r.initial_loss
        True
    """
    from tqdm.auto import tqdm

    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be two positive sizes (m, n), got {shape!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if isinstance(n_matrices, bool) or not isinstance(n_matrices, int) or n_matrices < 1:
        raise ValueError(f"n_matrices must be >= 1 (random matrices whose singular values are fitted), "
                         f"got {n_matrices!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    gen = torch.Generator().manual_seed(seed)
    sigma = _sample_singular_values((int(shape[0]), int(shape[1])), n_matrices, gen)
    params = torch.tensor(init, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([params], lr=lr)

    def abc(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, x1, x2 = p[0], p[1], p[2]
        s1, s2 = x1 * x1, x2 * x2
        return 1 + k * s1 * s2, -k * (s1 + s2), k

    def objective(p: torch.Tensor) -> torch.Tensor:
        a, b, c = abc(p)
        x = sigma
        for _ in range(steps):
            x2 = x * x
            x = x * (a + x2 * (b + c * x2))
        return ((x - 1) ** 2).mean()

    with torch.no_grad():
        initial = float(objective(params))
    history = []
    bar = tqdm(range(iterations), desc=f"fit {shape[0]}x{shape[1]} k={steps}", disable=not progress)
    for it in bar:
        opt.zero_grad()
        loss = objective(params)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if it % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
    with torch.no_grad():
        final = float(objective(params))
        a, b, c = (float(v) for v in abc(params))
    k, x1, x2 = (float(v) for v in params.detach())
    return FitResult(
        coefficients=(a, b, c),
        steps=steps,
        shape=(int(shape[0]), int(shape[1])),
        loss=final,
        initial_loss=initial,
        history=history,
        k_x1_x2=(k, x1, x2),
    )
