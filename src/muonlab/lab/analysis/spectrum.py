"""Singular values of a gradient and of the updates built from it: raw, Muon, AdamW, sign.

Seed 001: a gradient (or momentum) matrix of a hidden layer is nearly low-rank; a few "main"
directions carry large singular values and the "rare" directions small ones, so SGD's step (the
raw matrix) barely moves along them. Muon replaces the matrix by msign(G) ≈ U Vᵀ, which maps every
nonzero singular value towards 1: the rare directions get the same step as the main ones. AdamW's
first step g/(|g|+eps) is sign(G), an element-wise operation: it flattens the spectrum too, but
only partly, and without knowing about U and V.

``muonlab spectrum`` captures a gradient from a short AdamW run of the lab GPT (or makes a random
low-rank-plus-noise matrix), computes each update, and plots σ_i / σ_max of each on one log axis.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

CAPTION = ("orthogonalization lifts the rare (small-σ) directions (seed 001): msign maps every nonzero σ "
           "towards 1, while the raw gradient's spectrum falls off by orders of magnitude")


@dataclass
class Captured:
    """The matrix under study and where it came from."""

    G: Tensor  # the gradient (or momentum) matrix, float32
    source: str  # a description
    adamw_direction: Optional[Tensor] = None  # m̂ / (sqrt(v̂) + eps) from the real AdamW state
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Spectrum:
    name: str
    label: str
    singular_values: list[float]  # descending, unnormalized
    sigma_max: float
    normalized: list[float]  # singular_values / sigma_max
    stable_rank: float  # ‖X‖_F² / σ_max²: how many directions carry weight
    median_normalized: float  # the middle direction's σ relative to the top one
    frac_above_0p1: float  # share of directions within 10x of the top one


def random_lowrank(shape: tuple[int, int] = (256, 96), rank: int = 8, noise: float = 1e-3, seed: int = 0,
                   decay: float = 0.5) -> Captured:
    """U diag(s) Vᵀ with s = decay^i (i < rank) plus Gaussian noise of std ``noise``: a gradient-like matrix."""
    m, n = shape
    if rank < 1 or rank > min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for shape {m}x{n}, got {rank}")
    if not (noise >= 0):
        raise ValueError(f"noise must be >= 0, got {noise}")
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, rank, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen, dtype=torch.float64))
    s = decay ** torch.arange(rank, dtype=torch.float64)
    G = (U * s) @ V.T + noise * torch.randn(m, n, generator=gen, dtype=torch.float64)
    return Captured(G.float(), f"random rank-{rank} (σ = {decay:g}^i) + N(0, {noise:g}²) noise, {m}x{n}",
                    meta={"kind": "random-lowrank", "shape": [m, n], "rank": rank, "noise": noise, "seed": seed,
                          "decay": decay})


def capture_lab_matrix(
    param: str = "blocks.0.mlp.w1.weight",
    *,
    model_name: str = "tiny",
    steps: int = 20,
    batch_size: int = 8,
    seq_len: int = 64,
    max_bytes: int = 200_000,
    data: Optional[str] = None,
    cache_dir: Optional[str] = None,
    matrix: str = "grad",
    seed: int = 0,
) -> Captured:
    """Train the lab GPT ``steps`` AdamW steps (zoo defaults) on the corpus; return ``param``'s matrix.

    ``matrix="grad"``: the gradient of the last step; ``"momentum"``: AdamW's first moment m after
    the run. The real AdamW update direction m̂/(√v̂ + eps) of the last step comes along.
    """
    from muonlab.lab.data import load_corpus
    from muonlab.lab.model import GPT, GPTConfig
    from muonlab.lab.zoo import build_optimizer

    if matrix not in ("grad", "momentum"):
        raise ValueError(f"matrix must be 'grad' or 'momentum', got {matrix!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    cfg = GPTConfig.from_name(model_name)
    for label, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be a positive integer, got {v!r}")
    if seq_len > cfg.seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the {model_name} model's context length {cfg.seq_len}")
    corpus = load_corpus(data, max_bytes=max_bytes, cache_dir=cache_dir)
    torch.manual_seed(seed)
    model = GPT(cfg)
    params = dict(model.named_parameters())
    if param not in params:
        matrices = [n for n, p in params.items() if p.ndim == 2]
        raise ValueError(f"unknown parameter {param!r}; 2-D parameters of the {model_name} model: {', '.join(matrices)}")
    p = params[param]
    if p.ndim != 2:
        raise ValueError(f"parameter {param} has shape {tuple(p.shape)}; pick a 2-D matrix")
    opt = build_optimizer("adamw", model, size=model_name)
    losses = []
    for step in range(steps):
        x, y = corpus.get_batch("train", batch_size, seq_len, seed=seed, step=step)
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    st = opt.state[p]
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    t = float(st["step"])
    m_hat = st["exp_avg"] / (1 - beta1**t)
    v_hat = st["exp_avg_sq"] / (1 - beta2**t)
    direction = m_hat / (v_hat.sqrt() + group["eps"])  # torch.optim.AdamW's step, before lr and decay
    G = (p.grad if matrix == "grad" else st["exp_avg"]).detach().float().clone()
    return Captured(G, f"{'gradient' if matrix == 'grad' else 'AdamW momentum m'} of {param} {tuple(G.shape)} "
                       f"after {steps} AdamW steps of the {model_name} GPT", direction.detach().float().clone(),
                    meta={"kind": "lab", "param": param, "model": model_name, "steps": steps, "matrix": matrix,
                          "batch_size": batch_size, "seq_len": seq_len, "max_bytes": max_bytes,
                          "corpus": corpus.meta.get("source"), "losses": losses, "seed": seed})


def spectrum_of(name: str, label: str, X: Tensor) -> Spectrum:
    s = torch.linalg.svdvals(X.double())
    top = float(s[0]) if s.numel() else 0.0
    norm = (s / top) if top > 0 else s
    return Spectrum(
        name=name, label=label, singular_values=[float(v) for v in s], sigma_max=top,
        normalized=[float(v) for v in norm],
        stable_rank=float((s**2).sum() / top**2) if top > 0 else 0.0,
        median_normalized=float(norm.median()) if s.numel() else 0.0,
        frac_above_0p1=float((norm > 0.1).double().mean()) if s.numel() else 0.0,
    )


def update_spectra(cap: Captured, eps: float = 1e-8) -> list[Spectrum]:
    """Spectra of: the raw matrix; msign by SVD; Muon's NS under each preset; AdamW; sign(G)."""
    from muonlab import PRESETS, orthogonalize

    G = cap.G
    out = [spectrum_of("raw", "raw matrix G (SGD's step)", G)]
    out.append(spectrum_of("msign-svd", "exact msign(G) = UVᵀ (SVD)", orthogonalize(G, method="svd")))
    for name, preset in PRESETS.items():
        O = orthogonalize(G, method="newton_schulz", coefficients=name, steps=preset.default_steps)
        out.append(spectrum_of(f"muon-{name}", f"Muon NS '{name}' x{preset.default_steps}", O))
    out.append(spectrum_of("adamw-first", "AdamW first step g/(|g|+eps)", G / (G.abs() + eps)))
    if cap.adamw_direction is not None:
        out.append(spectrum_of("adamw-state", "AdamW m̂/(√v̂+eps) (real state)", cap.adamw_direction))
    out.append(spectrum_of("sign", "sign(G) (Lion / signSGD)", torch.sign(G)))
    return out


def to_json(cap: Captured, spectra: list[Spectrum]) -> dict[str, Any]:
    return {"source": cap.source, "shape": list(cap.G.shape), "meta": cap.meta, "caption": CAPTION,
            "spectra": [asdict(s) for s in spectra]}


_STYLE = {
    "raw": dict(color="black", lw=2.4),
    "msign-svd": dict(color="gray", lw=1.2, ls=":"),
    "adamw-first": dict(color="tab:green", lw=1.8, ls="--"),
    "adamw-state": dict(color="tab:green", lw=1.8),
    "sign": dict(color="tab:orange", lw=1.4, ls="-."),
}


def plot_spectra(cap: Captured, spectra: list[Spectrum], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13.5, 6.5))
    muon_colors = iter(["tab:purple", "tab:blue", "tab:red", "tab:brown", "tab:pink", "tab:cyan", "tab:olive"])
    floor = 1e-8
    for s in spectra:
        style = _STYLE.get(s.name) or dict(color=next(muon_colors), lw=1.5)
        idx = range(1, len(s.normalized) + 1)
        ax.semilogy(idx, [max(v, floor) for v in s.normalized], label=f"{s.label}: stable rank {s.stable_rank:.1f}",
                    **style)
    ax.set_xlabel("singular value index i (descending)")
    ax.set_ylabel("σ_i / σ_max  (each update divided by its own largest σ)")
    ax.set_ylim(bottom=max(floor, min(min(v for v in s.normalized if v > 0) for s in spectra) / 2), top=2.0)
    ax.grid(True, which="both", ls="--", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    wrapped = CAPTION.replace(": ", ":\n", 1)
    ax.set_title(f"{cap.source}\n{wrapped}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_spectra(cap: Captured, spectra: list[Spectrum], png: Path) -> tuple[Path, Path]:
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    data = png.with_suffix(".json")
    data.write_text(json.dumps(to_json(cap, spectra), indent=1))
    plot_spectra(cap, spectra, png)
    return png, data


def summary_rows(spectra: list[Spectrum]) -> list[list[Any]]:
    return [[s.name, s.sigma_max, s.normalized[-1] if s.normalized else math.nan, s.median_normalized,
             s.stable_rank, s.frac_above_0p1] for s in spectra]


SUMMARY_HEADERS = ["update", "σ_max", "σ_min/σ_max", "median σ/σ_max", "stable rank", "share σ > 0.1 σ_max"]
