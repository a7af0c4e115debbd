"""How fast each orthogonalizer approaches U Vᵀ: error per iteration and final singular-value band.

``muonlab ns-convergence --shape MxN`` prints the table made here; ``--plot`` draws it together
with each preset's scalar map x -> g^(k)(x) on [0, 1].
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from muonlab import PRESETS, orthogonalize, resolve_schedule, scalar_map


@dataclass
class ConvergenceRow:
    method: str
    preset: str
    errors: list[float]  # relative Frobenius error after k = 1..steps iterations
    sigma_min: float
    sigma_max: float


def parse_shape(text: str) -> tuple[int, int]:
    """Parse ``"1024x768"`` into (1024, 768) with a clear error otherwise."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"shape must look like MxN with positive integers, e.g. 1024x1024; got {text!r}")
    return dims  # type: ignore[return-value]


def make_test_matrix(shape: tuple[int, int], seed: int = 0, spectrum: str = "gaussian") -> torch.Tensor:
    """A float64 test matrix: Gaussian, or with a power-law spectrum like real gradients."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    G = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if spectrum == "gaussian":
        return G
    if spectrum == "powerlaw":
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        k = min(m, n)
        s = torch.arange(1, k + 1, dtype=torch.float64) ** -1.0
        return (U * s) @ Vh
    raise ValueError(f"unknown spectrum {spectrum!r}; valid: gaussian, powerlaw")


def ns_convergence(
    shape: tuple[int, int],
    steps: int = 8,
    *,
    seed: int = 0,
    spectrum: str = "gaussian",
    dtype: Optional[torch.dtype] = torch.float32,
    presets: Optional[list[str]] = None,
) -> list[ConvergenceRow]:
    """Error ‖X_k − UVᵀ‖_F / ‖UVᵀ‖_F for k = 1..steps for every method and preset."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    G = make_test_matrix(shape, seed, spectrum)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    ref = U @ Vh
    ref_norm = float(ref.norm())
    G_in = G.to(dtype or torch.float32)
    rows: list[ConvergenceRow] = []

    def run(method: str, preset: str, coefficients: object) -> None:
        errors = []
        out = None
        for k in range(1, steps + 1):
            out = orthogonalize(G_in, method=method, coefficients=coefficients, steps=k, dtype=dtype)  # type: ignore[arg-type]
            errors.append(float((out.double() - ref).norm()) / ref_norm)
        assert out is not None
        s = torch.linalg.svdvals(out.double())
        rows.append(ConvergenceRow(method, preset, errors, float(s.min()), float(s.max())))

    for name in presets or list(PRESETS):
        run("newton_schulz", name, name)
    run("gram", "keller", "keller")
    run("inverse_sqrt", "-", "keller")
    for method in ("svd", "svd_inv_sqrt"):
        out = orthogonalize(G_in, method=method)
        err = float((out.double() - ref).norm()) / ref_norm
        s = torch.linalg.svdvals(out.double())
        rows.append(ConvergenceRow(method, "-", [err] * steps, float(s.min()), float(s.max())))
    return rows


def write_json(rows: list[ConvergenceRow], path: Path, meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))


def plot_convergence(rows: list[ConvergenceRow], path: Path, title: str) -> None:
    """Error vs iteration (left) and the scalar map x -> g^(k)(x) of each preset (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = len(rows[0].errors)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ks = list(range(1, steps + 1))
    for r in rows:
        label = r.method if r.preset == "-" else f"{r.method}:{r.preset}"
        style = "--" if r.method.startswith("svd") else "-"
        ax1.semilogy(ks, [max(e, 1e-16) for e in r.errors], style, marker="o", ms=3, label=label)
    ax1.set_xlabel("iteration k")
    ax1.set_ylabel("‖X_k − UVᵀ‖_F / ‖UVᵀ‖_F")
    ax1.set_title(title)
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    x = torch.logspace(-4, 0, 1001, dtype=torch.float64)  # normalised singular values are mostly << 1
    for name in PRESETS:
        y = scalar_map(x, resolve_schedule(name, steps))
        ax2.plot(x.numpy(), y.numpy(), label=name)
    ax2.axhline(1.0, color="k", lw=0.8, ls=":")
    ax2.set_xscale("log")
    ax2.set_xlabel("singular value x of the normalised input (log scale)")
    ax2.set_ylabel(f"g^({steps})(x)")
    ax2.set_title(f"scalar map x -> g^({steps})(x) on [1e-4, 1]")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
