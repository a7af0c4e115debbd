"""Optimizer paths on 2-D test functions (seed 003): where do SGD, AdamW, Muon... walk?

Every optimizer here is the real implementation (``torch.optim.SGD/Adam/AdamW/...``,
``muonlab.Muon``, ``pytorch_optimizer.Lion``) stepping a 2-parameter tensor; only the loss is
hand-written. ``muonlab paths`` draws the paths over log-scaled contours and writes them as JSON.

Muon on a vector: the two coordinates are given to Muon as one (1, 2) matrix in a param group with
``algorithm="muon"``. A 1 x N matrix has a single singular value, so msign(M) = M / ‖M‖ (seed 000)
and Muon degenerates to normalized-direction descent with momentum: every step has length
``lr · g(1)``, where g is the preset's composed Newton-Schulz polynomial at 1 (Keller's quintic
after 5 steps: g(1) ≈ 0.70; exactly 1 for ``ns_method="svd"``). The interesting part of Muon,
equalizing the singular values of a matrix, has nothing to act on here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

# ---------------------------------------------------------------------------------------------
# Test functions (torch, so that autograd gives the gradient the optimizers see)
# ---------------------------------------------------------------------------------------------

QUAD_CONDITION = 25.0  # eigenvalue ratio of the quadratic's Hessian
QUAD_ANGLE = math.pi / 6  # its eigenvectors are rotated by 30 degrees: not axis-aligned


def rosenbrock(x: torch.Tensor, y: torch.Tensor, a: float = 1.0, b: float = 100.0) -> torch.Tensor:
    """(a - x)² + b (y - x²)², minimum 0 at (a, a²) = (1, 1): the banana valley of seed 003."""
    return (a - x) ** 2 + b * (y - x**2) ** 2


def quadratic(x: torch.Tensor, y: torch.Tensor, condition: float = QUAD_CONDITION,
              angle: float = QUAD_ANGLE) -> torch.Tensor:
    """½ dᵀ A d with d = (x, y) − (1, 1), A = R diag(1, condition) Rᵀ and R a rotation by ``angle``.

    Minimum 0 at (1, 1). The rotation keeps per-coordinate methods (Adam, sign methods) from
    seeing the curvature axes directly.
    """
    dx, dy = x - 1.0, y - 1.0
    c, s = math.cos(angle), math.sin(angle)
    u = c * dx + s * dy  # coordinate along the flat eigenvector (eigenvalue 1)
    v = -s * dx + c * dy  # along the steep one (eigenvalue ``condition``)
    return 0.5 * (u**2 + condition * v**2)


@dataclass(frozen=True)
class TestFunction:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    formula: str
    minimum: tuple[float, float]
    default_start: tuple[float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]


FUNCTIONS: dict[str, TestFunction] = {
    "rosenbrock": TestFunction("rosenbrock", rosenbrock, "f(x, y) = (1 - x)² + 100 (y - x²)²", (1.0, 1.0),
                               (-1.5, 2.5), (-2.0, 2.0), (-1.0, 3.0)),
    "quadratic": TestFunction("quadratic", quadratic,
                              f"f = ½ dᵀAd, d = (x,y) - (1,1), κ(A) = {QUAD_CONDITION:g}, axes rotated 30°",
                              (1.0, 1.0), (-1.5, 2.5), (-2.0, 2.5), (-0.5, 3.0)),
}

# ---------------------------------------------------------------------------------------------
# The optimizers: real implementations acting on one tensor
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathOptimizer:
    name: str
    label: str
    build: Callable[[torch.Tensor, float, dict[str, Any]], torch.optim.Optimizer]
    default_lr: dict[str, float]  # by function name
    matrix: bool = False  # the parameter is given as a (1, 2) matrix (Muon)
    color: str = "k"


def _muon(p: torch.Tensor, lr: float, opts: dict[str, Any]) -> torch.optim.Optimizer:
    from muonlab import Muon

    kw: dict[str, Any] = {"momentum": 0.95, "nesterov": True}
    kw.update(opts)
    return Muon([{"params": [p], "algorithm": "muon", "param_names": ["xy"]}], lr=lr, **kw)


def _lion(p: torch.Tensor, lr: float, opts: dict[str, Any]) -> torch.optim.Optimizer:
    try:
        from pytorch_optimizer import Lion
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lion comes from pytorch-optimizer: pip install 'muonlab[lab]'") from exc
    return Lion([p], lr=lr, **{"betas": (0.9, 0.99), **opts})


def _torch(cls_name: str, **fixed: Any) -> Callable[[torch.Tensor, float, dict[str, Any]], torch.optim.Optimizer]:
    def build(p: torch.Tensor, lr: float, opts: dict[str, Any]) -> torch.optim.Optimizer:
        return getattr(torch.optim, cls_name)([p], lr=lr, **{**fixed, **opts})

    return build


# Default learning rates chosen so that 200-300 steps from the default start show each method's
# character (seed 003 uses SGD+momentum 5e-4, AdamW 0.05, Muon 0.05 on the Rosenbrock function).
PATH_OPTIMIZERS: dict[str, PathOptimizer] = {o.name: o for o in [
    PathOptimizer("sgd", "SGD", _torch("SGD"), {"rosenbrock": 1e-3, "quadratic": 0.05}, color="tab:gray"),
    PathOptimizer("sgd-momentum", "SGD + momentum 0.9", _torch("SGD", momentum=0.9),
                  {"rosenbrock": 5e-4, "quadratic": 0.01}, color="tab:blue"),
    PathOptimizer("nesterov", "SGD + Nesterov 0.9", _torch("SGD", momentum=0.9, nesterov=True),
                  {"rosenbrock": 5e-4, "quadratic": 0.01}, color="tab:cyan"),
    PathOptimizer("adam", "Adam", _torch("Adam"), {"rosenbrock": 0.05, "quadratic": 0.05}, color="tab:olive"),
    # torch's AdamW defaults (betas 0.9/0.999, weight decay 0.01), as in seed 003's AdamW
    PathOptimizer("adamw", "AdamW", _torch("AdamW"), {"rosenbrock": 0.05, "quadratic": 0.05}, color="tab:green"),
    PathOptimizer("rmsprop", "RMSprop", _torch("RMSprop"), {"rosenbrock": 0.01, "quadratic": 0.01}, color="tab:brown"),
    PathOptimizer("adagrad", "Adagrad", _torch("Adagrad"), {"rosenbrock": 0.5, "quadratic": 0.5}, color="tab:pink"),
    PathOptimizer("lion", "Lion", _lion, {"rosenbrock": 0.01, "quadratic": 0.01}, color="tab:orange"),
    PathOptimizer("muon", "Muon (1x2 matrix)", _muon, {"rosenbrock": 0.05, "quadratic": 0.05}, matrix=True,
                  color="tab:purple"),
]}

DISPLAY_FLOOR = 1e-12  # f values below this are drawn at it (the JSON keeps the exact values)
DEFAULT_STEPS = 500
DEFAULT_OPTIMIZERS = ("sgd-momentum", "adamw", "muon", "lion")
MUON_CAPTION = ("Muon on a 2-vector (a 1x2 matrix) degenerates to normalized-direction descent: "
                "msign(m) = m/‖m‖, each step has length lr·g(1)")


@dataclass
class OptimizerPath:
    name: str
    label: str
    lr: float
    points: list[list[Optional[float]]]  # steps + 1 points [x, y]; None after a divergence
    values: list[Optional[float]]  # f at each point
    diverged_at: Optional[int] = None  # first step whose point was not finite
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def final_value(self) -> Optional[float]:
        finite = [v for v in self.values if v is not None]
        return finite[-1] if finite else None


def parse_lr_overrides(text: Optional[str]) -> dict[str, float]:
    """``"sgd=1e-3,muon=0.05"`` -> {"sgd": 0.001, "muon": 0.05}; a clear ValueError otherwise."""
    out: dict[str, float] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in PATH_OPTIMIZERS:
            raise ValueError(f"--lr items look like NAME=VALUE with NAME in {', '.join(PATH_OPTIMIZERS)}; got {item!r}")
        try:
            lr = float(value)
        except ValueError:
            raise ValueError(f"--lr {name}: {value!r} is not a number") from None
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"--lr {name}: learning rate must be a finite number > 0, got {value}")
        out[name] = lr
    return out


def parse_point(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--start must look like X,Y (e.g. -1.5,2.5); got {text!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"--start must be finite, got {text!r}")
    return x, y


def parse_optimizers(text: str | Sequence[str]) -> list[str]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ValueError(f"no optimizer given; valid: {', '.join(PATH_OPTIMIZERS)}")
    for n in names:
        if n not in PATH_OPTIMIZERS:
            raise ValueError(f"unknown optimizer {n!r} for paths; valid: {', '.join(PATH_OPTIMIZERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"optimizer listed twice: {names}")
    return names


def run_path(
    name: str,
    function: str = "rosenbrock",
    *,
    start: Optional[tuple[float, float]] = None,
    steps: int = 200,
    lr: Optional[float] = None,
    options: Optional[dict[str, Any]] = None,
    blowup: float = 1e6,
) -> OptimizerPath:
    """Run optimizer ``name`` for ``steps`` steps on ``function`` from ``start`` (float64).

    ``options`` go to the optimizer's constructor (e.g. ``{"momentum": 0.0, "nesterov": False}``
    for Muon). A path whose point leaves |x|, |y| < ``blowup`` or turns non-finite stops there;
    its remaining points are ``None``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if function not in FUNCTIONS:
        raise ValueError(f"unknown function {function!r}; valid: {', '.join(FUNCTIONS)}")
    if name not in PATH_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} for paths; valid: {', '.join(PATH_OPTIMIZERS)}")
    spec, fn = PATH_OPTIMIZERS[name], FUNCTIONS[function]
    start = fn.default_start if start is None else start
    lr = spec.default_lr[function] if lr is None else lr
    shape = (1, 2) if spec.matrix else (2,)
    p = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64).reshape(shape))
    opt = spec.build(p, lr, dict(options or {}))

    def value() -> torch.Tensor:
        xy = p.reshape(2)
        return fn.fn(xy[0], xy[1])

    points: list[list[Optional[float]]] = [[float(start[0]), float(start[1])]]
    values: list[Optional[float]] = [float(value().detach())]
    diverged = None
    for step in range(1, steps + 1):
        if diverged is None:
            opt.zero_grad(set_to_none=True)
            loss = value()
            loss.backward()
            opt.step()
            xy = p.detach().reshape(2).tolist()
            if all(math.isfinite(v) and abs(v) < blowup for v in xy):
                points.append([float(xy[0]), float(xy[1])])
                values.append(float(value().detach()))
                continue
            diverged = step
        points.append([None, None])
        values.append(None)
    return OptimizerPath(name, spec.label, float(lr), points, values, diverged, dict(options or {}))


def run_paths(
    optimizers: Sequence[str] = DEFAULT_OPTIMIZERS,
    function: str = "rosenbrock",
    *,
    start: Optional[tuple[float, float]] = None,
    steps: int = 200,
    lrs: Optional[dict[str, float]] = None,
    options: Optional[dict[str, dict[str, Any]]] = None,
) -> list[OptimizerPath]:
    lrs, options = lrs or {}, options or {}
    unknown = sorted(set(lrs) - set(optimizers))
    if unknown:
        raise ValueError(f"--lr given for {unknown}, which are not in the optimizer list {list(optimizers)}")
    return [run_path(n, function, start=start, steps=steps, lr=lrs.get(n), options=options.get(n)) for n in optimizers]


def muon_vector_step_factor(options: Optional[dict[str, Any]] = None) -> float:
    """g(1): the length of one Muon step on a 1 x N matrix in units of lr (from the NS preset)."""
    from muonlab import resolve_schedule, scalar_map

    opts = options or {}
    method = opts.get("ns_method", "auto")
    if method in ("svd", "svd_inv_sqrt"):
        return 1.0
    if method == "inverse_sqrt":
        return float("nan")
    coeffs = opts.get("ns_coefficients", "keller")
    steps = opts.get("ns_steps", 5)
    eps = opts.get("eps", 1e-7)
    x = torch.tensor([1.0 / (1.0 + eps)], dtype=torch.float64)
    return float(scalar_map(x, resolve_schedule(coeffs, steps)))


def _round(v: Optional[float]) -> Optional[float]:
    return None if v is None else float(f"{v:.10g}")


def to_json(paths: list[OptimizerPath], function: str, start: tuple[float, float], steps: int) -> dict[str, Any]:
    fn = FUNCTIONS[function]
    return {
        "function": function,
        "formula": fn.formula,
        "minimum": list(fn.minimum),
        "start": list(start),
        "steps": steps,
        "muon_note": MUON_CAPTION + f" (g(1) = {muon_vector_step_factor():.4f} for Keller x5)",
        "paths": [{**asdict(p), "points": [[_round(v) for v in pt] for pt in p.points],
                   "values": [_round(v) for v in p.values], "final_value": p.final_value} for p in paths],
    }


def plot_paths(paths: list[OptimizerPath], function: str, start: tuple[float, float], path: Path) -> None:
    """Paths over log-scaled contours of ``function``, with the start and the minimum marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fn = FUNCTIONS[function]
    xs = [v for p in paths for pt in p.points for v in pt[:1] if v is not None] + [start[0], fn.minimum[0]]
    ys = [v for p in paths for pt in p.points for v in pt[1:] if v is not None] + [start[1], fn.minimum[1]]
    # the default window, widened (within reason) to show every finite point
    x0, x1 = min(fn.xlim[0], min(xs) - 0.2), max(fn.xlim[1], max(xs) + 0.2)
    y0, y1 = min(fn.ylim[0], min(ys) - 0.2), max(fn.ylim[1], max(ys) + 0.2)
    x0, x1, y0, y1 = max(x0, -10), min(x1, 10), max(y0, -10), min(y1, 10)
    gx = torch.linspace(x0, x1, 400, dtype=torch.float64)
    gy = torch.linspace(y0, y1, 400, dtype=torch.float64)
    X, Y = torch.meshgrid(gx, gy, indexing="xy")
    Z = fn.fn(X, Y).numpy() + 1e-12
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 6.4), gridspec_kw={"width_ratios": [1.25, 1]})
    levels = torch.logspace(math.log10(max(Z.min(), 1e-3)), math.log10(Z.max()), 30).numpy()
    ax.contour(X.numpy(), Y.numpy(), Z, levels=levels, norm=LogNorm(), cmap="Greys", alpha=0.5, linewidths=0.8)
    ax.plot(*fn.minimum, marker="*", color="red", ms=18, ls="none", label=f"minimum {fn.minimum}", zorder=5)
    ax.plot(*start, marker="s", color="black", ms=8, ls="none", label=f"start {tuple(start)}", zorder=5)
    for p in paths:
        color = PATH_OPTIMIZERS[p.name].color
        pts = [pt for pt in p.points if pt[0] is not None]
        px, py = [q[0] for q in pts], [q[1] for q in pts]
        final = p.final_value
        tail = "diverged at step %d" % p.diverged_at if p.diverged_at else f"final f = {final:.2e}"
        label = f"{p.label}, lr={p.lr:g}: {tail}"
        ax.plot(px, py, ".-", color=color, lw=1.3, ms=2.5, alpha=0.85, label=label)
        ax.plot(px[-1], py[-1], "o", color=color, ms=7, mec="black", zorder=6)
        vals = [v for v in p.values if v is not None]
        ax2.semilogy(range(len(vals)), [max(v, DISPLAY_FLOOR) for v in vals], color=color, lw=1.4, label=label)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("paths over log-spaced contours of f", fontsize=10)
    ax.legend(fontsize=7.5, loc="lower right" if function == "rosenbrock" else "upper right")
    ax.grid(True, ls="--", alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"f(x, y)  (log scale, floored at {DISPLAY_FLOOR:g})")
    ax2.set_title("objective per step", fontsize=10)
    ax2.grid(True, which="both", ls="--", alpha=0.3)
    ax2.legend(fontsize=7.5)
    steps = len(paths[0].points) - 1 if paths else 0
    fig.suptitle(f"{fn.name}: {fn.formula}, {steps} steps, real torch / muonlab / pytorch-optimizer optimizers\n"
                 f"{MUON_CAPTION}, g(1) ≈ {muon_vector_step_factor():.2f} for Keller x5",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_paths(paths: list[OptimizerPath], function: str, start: tuple[float, float], steps: int,
                png: Path) -> tuple[Path, Path]:
    """Draw ``png`` and write the path data to the same name with ``.json``; returns both paths."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    data = png.with_suffix(".json")
    data.write_text(json.dumps(to_json(paths, function, start, steps)))
    plot_paths(paths, function, start, png)
    return png, data
