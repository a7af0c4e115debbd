"""Scaling study: how Muon's token and time speed-up over AdamW moves with model size.

For each model size, :func:`scaling` runs the sample-efficiency measurement of
:func:`muonlab.lab.compare.efficiency` (the baseline at N steps, the optimizer in separate, fully
decayed runs at fractions of N, both with a learning-rate sweep) with a token budget proportional
to the model's non-embedding parameters. The sweeps must bracket their optima (the baseline's, and
the optimizer's at the full budget): when a best learning rate is at an end of the grid, the grid
is extended on that side (and the runs already done are reused) until it is inside, or the
extension limit is reached (then the result says so). Two seeds at the smallest and the largest size, one in between (``seeds_ends`` /
``seeds_middle``).

Every run is cached on disk under ``OUT/<size>/runs/...``, so an interrupted study resumes where it
stopped. Writes ``scaling.json``, ``scaling.csv``, ``scaling.png`` (speed-ups against non-embedding
parameters, with the published trend drawn for reference) and ``report.html`` (``muonlab report
OUT`` redraws it).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .compare import DEFAULT_FRACTIONS, SWEEP_MULTIPLIERS, efficiency, study_config
from .train import RunFolder, TrainConfig, atomic_write_bytes, atomic_write_text, environment, read_json

# Wen, Hall, Ma & Liang 2025, "Fantastic Pretraining Optimizers and Where to Find Them" (arXiv
# 2509.02046): against a well-tuned AdamW, Muon's token speed-up is about 1.4x at 0.1B parameters
# and about 1.1x at 1.2B (as quoted in issue 14). Drawn as a straight line in log(parameters).
PUBLISHED_TREND = ((0.1e9, 1.4), (1.2e9, 1.1))
DEFAULT_SIZES = ("micro", "tiny", "mini", "small")
MAX_EXTENSIONS = 2
COLUMNS = ["model", "params", "non_embedding_params", "steps", "tokens", "baseline_lr", "baseline_lr_bracketed",
           "baseline_val_loss", "optimizer_best_lr_full_budget", "optimizer_lr_bracketed", "token_speedup", "time_speedup",
           "per_seed_token_ratio", "seeds", "train_time_s", "elapsed_s"]


def parameter_counts(size: str, base: Optional[TrainConfig] = None, vocab_size: int = 256) -> tuple[int, int]:
    """(all parameters, non-embedding parameters) of the lab GPT of ``size`` with the run's overrides
    and the tokenizer's vocabulary (built on the meta device)."""
    import torch

    from .model import GPT
    from .train import model_config

    cfg = replace(base if base is not None else TrainConfig(), model=size)
    with torch.device("meta"):
        model = GPT(model_config(cfg, vocab_size))
    return model.num_parameters(), model.num_parameters(non_embedding=True)


def steps_for(non_embedding: int, tokens_per_param: float, batch_size: int, seq_len: int, min_steps: int) -> int:
    """Optimizer steps that give ``tokens_per_param`` training tokens per non-embedding parameter."""
    return max(min_steps, math.ceil(tokens_per_param * non_embedding / (batch_size * seq_len)))


def scaling(
    sizes: Sequence[str] = DEFAULT_SIZES,
    optimizer: str = "normuon",
    baseline: str = "adamw",
    *,
    base: Optional[TrainConfig] = None,
    tokens_per_param: float = 4.0,
    min_steps: int = 100,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    sweep: bool = True,
    seeds_ends: tuple[int, ...] = (0, 1),
    seeds_middle: tuple[int, ...] = (0,),
    out: Optional[str | Path] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) the study; returns what ``scaling.json`` holds."""
    from .model import MODEL_SIZES

    sizes = list(sizes)
    if len(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes must be distinct model size names, got {sizes}")
    for s in sizes:
        if s not in MODEL_SIZES:
            raise ValueError(f"unknown model size {s!r}; valid names: {', '.join(MODEL_SIZES)}")
    if not (isinstance(tokens_per_param, (int, float)) and 0 < tokens_per_param < math.inf):
        raise ValueError(f"tokens_per_param must be a positive number, got {tokens_per_param!r}")
    base = replace(base) if base is not None else TrainConfig()
    base.validate()
    out_dir = Path(out) if out is not None else Path("runs") / time.strftime("scaling-%Y%m%d-%H%M%S")
    with RunFolder(out_dir, useful=lambda d: any(d.iterdir())):
        return _scaling(sizes, optimizer, baseline, base, tokens_per_param, min_steps, fractions, sweep, seeds_ends,
                        seeds_middle, out_dir, progress, log)


def _scaling(sizes: list[str], optimizer: str, baseline: str, base: TrainConfig, tokens_per_param: float,
             min_steps: int, fractions: tuple[float, ...], sweep: bool, seeds_ends: tuple[int, ...],
             seeds_middle: tuple[int, ...], out_dir: Path, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from .data import load_corpus
    from .train import model_config

    corpus = load_corpus(base.data, max_bytes=base.max_corpus_bytes, tokenizer=base.tokenizer)
    counts = {s: parameter_counts(s, base, corpus.vocab_size) for s in sizes}
    order = sorted(sizes, key=lambda s: counts[s][1])
    rows = []
    for i, size in enumerate(order):
        mcfg = model_config(replace(base, model=size), corpus.vocab_size)
        seq_len = base.seq_len or mcfg.seq_len
        steps = steps_for(counts[size][1], tokens_per_param, base.batch_size * base.grad_accum, seq_len, min_steps)
        seeds = seeds_ends if i in (0, len(order) - 1) else seeds_middle
        cfg = replace(base, model=size, seq_len=seq_len, steps=steps, eval_every=max(1, steps // 10),
                      checkpoint_every=max(1, steps // 4))
        multipliers = tuple(SWEEP_MULTIPLIERS) if sweep else (1.0,)
        t0 = time.perf_counter()
        log(f"muonlab scaling: {size} ({counts[size][1]:,} non-embedding parameters), {steps} steps, "
            f"seeds {list(seeds)}")
        for extension in range(MAX_EXTENSIONS + 1):
            res = efficiency(optimizer, baseline, base=cfg, fractions=fractions, sweep=sweep,
                             lr_multipliers=multipliers, seeds=seeds, out=out_dir / size, progress=progress,
                             log=log)
            # both optima inside their grids: the baseline's and the optimizer's at the full budget
            inside, side = res["baseline_lr_bracketed"], res["baseline_lr_edge"]
            opt_inside, opt_side = res["optimizer_lr_bracketed"], res["optimizer_lr_edge"]
            if (inside and opt_inside) or extension == MAX_EXTENSIONS:
                break
            for who, ok, sd in ((baseline, inside, side), (optimizer, opt_inside, opt_side)):
                if ok:
                    continue
                if sd < 0 and min(multipliers) / 2 not in multipliers:
                    multipliers = (min(multipliers) / 2,) + multipliers
                elif sd > 0 and max(multipliers) * 2 not in multipliers:
                    multipliers = multipliers + (max(multipliers) * 2,)
                log(f"  {who}'s best lr is at the {'low' if sd < 0 else 'high'} end of its sweep: trying "
                    f"{[round(m, 3) for m in multipliers]} x each default")
        train_time = _train_time(out_dir / size / "runs")
        rows.append({
            "model": size, "params": counts[size][0], "non_embedding_params": counts[size][1], "steps": steps,
            "tokens": res["baseline_result"]["tokens"], "baseline_lr": res["baseline_result"]["best_lr"],
            "baseline_lr_bracketed": inside, "baseline_val_loss": res["baseline_result"]["final_val_loss"],
            "optimizer_best_lr_full_budget": res["optimizer_full_budget_lr"], "optimizer_lr_bracketed": opt_inside,
            "token_speedup": res["token_speedup"],
            "time_speedup": res["time_speedup"], "per_seed_token_ratio": res["per_seed_token_ratio"],
            "seeds": list(seeds), "train_time_s": train_time, "elapsed_s": time.perf_counter() - t0,
        })
        _write(rows, optimizer, baseline, base, tokens_per_param, out_dir)  # after every size: resumable output
        ts = "not reached" if res["token_speedup"] is None else f"{res['token_speedup']:.2f}x"
        log(f"  {size}: {optimizer} token speed-up {ts} over {baseline}; {train_time / 60:.1f} min of training")
    return json.loads((out_dir / "scaling.json").read_text())


def _train_time(runs: Path) -> float:
    """Total training seconds of the finished runs under ``runs`` (cached ones included)."""
    total = 0.0
    for path in runs.glob("*/*/result.json"):
        try:
            total += float(read_json(path, "result file").get("wall_time_s") or 0.0)
        except (ValueError, OSError):
            continue
    return total


def _write(rows: list[dict[str, Any]], optimizer: str, baseline: str, base: TrainConfig, tokens_per_param: float,
           out_dir: Path) -> None:
    result = {"optimizer": optimizer, "baseline": baseline, "tokens_per_param": tokens_per_param,
              "published_trend": [{"params": p, "token_speedup": s} for p, s in PUBLISHED_TREND],
              "published_trend_source": "Wen et al. 2025, arXiv 2509.02046 (Muon vs well-tuned AdamW)",
              "sizes": rows, "config": study_config(base), "environment": environment()}
    atomic_write_text(out_dir / "scaling.json", json.dumps(result, indent=2, default=str))
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([json.dumps(r[c]) if isinstance(r[c], (dict, list)) else r[c] for c in COLUMNS])
    atomic_write_bytes(out_dir / "scaling.csv", buf.getvalue().encode("utf-8"))
    from .report import write_scaling_report

    write_scaling_report(out_dir)  # draws scaling.png and the report.html page from scaling.json


def plot_scaling(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["sizes"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [r["non_embedding_params"] for r in rows]
    for key, label, style in (("token_speedup", "token speed-up", "o-"), ("time_speedup", "time speed-up", "s--")):
        pts = [(x, r[key]) for x, r in zip(xs, rows) if r[key] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{result['optimizer']} {label} (measured)")
    # the published points as measured, and their log-linear trend carried out to the sizes run here
    # (an extrapolation, drawn fainter: the paper measured 0.1B to 1.2B only)
    (p0, s0), (p1, s1) = PUBLISHED_TREND
    lo, hi = min(xs + [p0]) / 1.5, max(xs + [p1]) * 1.5
    slope = (s1 - s0) / math.log(p1 / p0)
    ax.plot([p0, p1], [s0, s1], "^-", color="gray", label="published token speed-up (Wen et al. 2025)")
    ax.plot([lo, hi], [s0 + slope * math.log(lo / p0), s0 + slope * math.log(hi / p0)], ":", color="gray",
            alpha=0.6, label="its log-linear trend, extrapolated")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel(f"speed-up over {result['baseline']}")
    ax.set_title(f"{result['optimizer']} vs {result['baseline']}: {result['tokens_per_param']:g} "
                 f"token{'' if result['tokens_per_param'] == 1 else 's'} per non-embedding parameter")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_scaling(result: dict[str, Any]) -> str:
    from .tables import format_table

    rows = [[r["model"], f"{r['non_embedding_params']:,}", r["steps"], f"{r['tokens']:,}",
             f"{r['baseline_lr']:.3g}" + ("" if r["baseline_lr_bracketed"] else " (edge)"),
             f"{r['baseline_val_loss']:.4f}",
             "-" if r["token_speedup"] is None else f"{r['token_speedup']:.2f}x",
             "-" if r["time_speedup"] is None else f"{r['time_speedup']:.2f}x",
             f"{r['train_time_s'] / 60:.1f}"] for r in result["sizes"]]
    head = ["model", "non-emb params", "steps", "tokens", f"{result['baseline']} lr", f"{result['baseline']} loss",
            "token speed-up", "time speed-up", "train min"]
    return format_table(head, rows)
