"""Fair side-by-side comparison of optimizers: same init, data order, schedule and budget.

``compare()`` trains every (optimizer, learning rate, seed) into ``OUT/runs/...`` (cached per
configuration and resumable), picks each optimizer's best learning rate by final validation loss,
and writes ``summary.json`` and ``summary.csv`` before drawing the report from those files.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional

from .data import load_corpus
from .train import TrainConfig, atomic_write_text, environment, read_metrics, train
from .zoo import get_entry, parse_optimizer_list

SWEEP_MULTIPLIERS = (0.5, 1.0, 2.0)  # around each entry's per-size default learning rate


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")


def steps_for_tokens(tokens: int, cfg: TrainConfig, seq_len: int) -> int:
    per_step = cfg.batch_size * seq_len * cfg.grad_accum
    steps = math.ceil(tokens / per_step)
    if steps < 1:
        raise ValueError(f"--tokens {tokens} is less than one step of {per_step} tokens")
    return steps


def _run_name(optimizer: str, lr: float, seed: int) -> str:
    return f"{optimizer}/lr{lr:.3g}_seed{seed}"


def crossing(rows: list[dict[str, Any]], target: float, key: str) -> Optional[float]:
    """First value of ``key`` (tokens or time_s) at which the eval curve reaches ``target``,
    linearly interpolated between evaluations; None if it never does."""
    evals = [r for r in rows if r.get("kind") == "eval"]
    for prev, cur in zip(evals, evals[1:]):
        if cur["val_loss"] <= target:
            if prev["val_loss"] <= target:
                return float(prev[key])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - cur["val_loss"])
            return float(prev[key] + frac * (cur[key] - prev[key]))
    return None


def compare(
    optimizers: list[str] | str = ("muon", "adamw"),
    *,
    base: Optional[TrainConfig] = None,
    tokens: Optional[int] = None,
    sweep: bool = False,
    lr_multipliers: tuple[float, ...] = SWEEP_MULTIPLIERS,
    seeds: tuple[int, ...] = (0,),
    out: Optional[str | Path] = None,
    baseline: Optional[str] = None,
    progress: bool = True,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compare optimizers on the lab GPT and write the results folder; returns the summary."""
    names = parse_optimizer_list(optimizers)
    base = replace(base) if base is not None else TrainConfig()
    base.validate()
    if not seeds:
        raise ValueError("at least one seed is needed")
    out_dir = Path(out) if out is not None else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(base.data, max_bytes=base.max_corpus_bytes)
    from .model import GPTConfig

    seq_len = base.seq_len or GPTConfig.from_name(base.model, **base.model_overrides).seq_len
    if tokens is not None:
        base.steps = steps_for_tokens(tokens, base, seq_len)
    if baseline is None:
        baseline = next((n for n in names if n == "adamw"), None) or next(
            (n for n in names if get_entry(n).family != "muon"), names[0])
    elif baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not among the compared optimizers {names}")

    runs: dict[str, list[dict[str, Any]]] = {}
    plan = []
    for name in names:
        default_lr = get_entry(name).lr_for(base.model)
        lrs = [default_lr * m for m in lr_multipliers] if sweep else [default_lr]
        for lr in lrs:
            for seed in seeds:
                plan.append((name, lr, seed))
    log(f"muonlab compare: {len(plan)} runs of {base.model} for {base.steps} steps "
        f"({base.steps * base.batch_size * seq_len * base.grad_accum:,} tokens each) -> {out_dir}")
    for i, (name, lr, seed) in enumerate(plan, 1):
        cfg = replace(base, optimizer=name, lr=lr, seed=seed)
        run_dir = out_dir / "runs" / _run_name(name, lr, seed)
        if progress:
            log(f"[{i}/{len(plan)}] {name} lr={lr:.3g} seed={seed}")
        try:
            res = train(cfg, run_dir, progress=progress, corpus=corpus)
        except FloatingPointError as exc:
            log(f"  diverged: {exc}")
            res = {"finished": True, "diverged": True, "optimizer": name, "lr": lr, "seed": seed,
                   "final_val_loss": math.inf, "tokens": 0, "wall_time_s": 0.0}
        res = {**res, "run_dir": str(run_dir.relative_to(out_dir))}
        runs.setdefault(name, []).append(res)
        if progress and not res.get("diverged"):
            log(f"  final val loss {res['final_val_loss']:.4f}  ({res['wall_time_s']:.1f}s, {res['step_ms']:.1f} ms/step)")

    summary = summarize(runs, baseline, out_dir)
    summary["config"] = {**asdict(base), "seeds": list(seeds), "sweep": sweep,
                         "lr_multipliers": list(lr_multipliers) if sweep else [1.0]}
    summary["corpus"] = corpus.meta
    summary["environment"] = environment()
    write_summary(summary, out_dir)
    if report:
        from .report import write_report

        path = write_report(out_dir)
        log(f"report: {path}")
    log(format_summary(summary))
    return summary


def summarize(runs: dict[str, list[dict[str, Any]]], baseline: str, out_dir: Path) -> dict[str, Any]:
    """Best lr per optimizer (mean final val loss over seeds), then speed-ups against the baseline."""
    per_opt: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in results:
            by_lr.setdefault(r["lr"], []).append(r)
        sweep = []
        for lr, rs in sorted(by_lr.items()):
            losses = [r["final_val_loss"] for r in rs]
            sweep.append({"lr": lr, "final_val_loss": statistics.fmean(losses), "seeds": len(rs),
                          "diverged": any(r.get("diverged") for r in rs)})
        best = min(sweep, key=lambda s: s["final_val_loss"])
        chosen = [r for r in by_lr[best["lr"]] if not r.get("diverged")]
        losses = [r["final_val_loss"] for r in chosen] or [math.inf]
        per_opt[name] = {
            "optimizer": name,
            "family": get_entry(name).family,
            "best_lr": best["lr"],
            "final_val_loss": statistics.fmean(losses),
            "final_val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "seeds": len(chosen),
            "tokens": chosen[0]["tokens"] if chosen else 0,
            "wall_time_s": statistics.fmean([r["wall_time_s"] for r in chosen]) if chosen else math.nan,
            "step_ms": statistics.fmean([r["step_ms"] for r in chosen]) if chosen else math.nan,
            "optimizer_state_bytes": chosen[0].get("optimizer_state_bytes") if chosen else None,
            "runs": [r["run_dir"] for r in chosen],
            "run_seeds": [r["seed"] for r in chosen],
            "sweep": sweep,
        }
    target = per_opt[baseline]["final_val_loss"]
    # paired by seed (same init and data order): the target of a seed is the baseline's final loss at that seed
    base_by_seed = {seed: json.loads((out_dir / rd / "result.json").read_text())["final_val_loss"]
                    for rd, seed in zip(per_opt[baseline]["runs"], per_opt[baseline]["run_seeds"])}
    for name, s in per_opt.items():
        tok, tim = [], []
        for rd, seed in zip(s["runs"], s["run_seeds"]):
            rows = read_metrics(out_dir / rd)
            seed_target = base_by_seed.get(seed, target)
            tok.append(crossing(rows, seed_target, "tokens"))
            tim.append(crossing(rows, seed_target, "time_s"))
        reached = all(v is not None for v in tok) and bool(tok)
        s["tokens_to_baseline"] = statistics.fmean(tok) if reached else None  # type: ignore[arg-type]
        s["time_to_baseline_s"] = statistics.fmean(tim) if reached else None  # type: ignore[arg-type]
        base_s = per_opt[baseline]
        s["speedup_tokens"] = (base_s["tokens"] / s["tokens_to_baseline"]) if reached and s["tokens_to_baseline"] else None
        s["speedup_time"] = (base_s["wall_time_s"] / s["time_to_baseline_s"]) if reached and s["time_to_baseline_s"] else None
    return {"baseline": baseline, "target_val_loss": target, "optimizers": per_opt}


SUMMARY_COLUMNS = ["optimizer", "best_lr", "final_val_loss", "final_val_loss_std", "seeds", "tokens", "wall_time_s",
                   "step_ms", "tokens_to_baseline", "time_to_baseline_s", "speedup_tokens", "speedup_time",
                   "optimizer_state_bytes"]


def write_summary(summary: dict[str, Any], out_dir: Path) -> None:
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    tmp = out_dir / "summary.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SUMMARY_COLUMNS)
        for s in summary["optimizers"].values():
            w.writerow([s.get(c) for c in SUMMARY_COLUMNS])
    tmp.replace(out_dir / "summary.csv")


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)


def format_summary(summary: dict[str, Any]) -> str:
    from .tables import format_table

    rows = []
    for s in summary["optimizers"].values():
        rows.append([
            s["optimizer"], f"{s['best_lr']:.3g}", s["final_val_loss"], s["tokens"], s["wall_time_s"], s["step_ms"],
            "-" if s["speedup_tokens"] is None else f"{s['speedup_tokens']:.2f}x",
            "-" if s["speedup_time"] is None else f"{s['speedup_time']:.2f}x",
        ])
    head = ["optimizer", "lr", "final val loss", "tokens", "time (s)", "ms/step", "tokens speed-up", "time speed-up"]
    return (f"baseline {summary['baseline']} final val loss {summary['target_val_loss']:.4f}\n"
            + format_table(head, rows))
