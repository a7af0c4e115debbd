"""Fair side-by-side comparison of optimizers: same init, data order, schedule and budget.

``compare()`` trains every (optimizer, learning rate, seed) into ``OUT/runs/...`` (cached per
configuration and resumable), picks each optimizer's best learning rate by final validation loss,
and writes ``summary.json`` and ``summary.csv`` before drawing the report from those files. Losses are
nats per token of the run's tokenizer; ``final_val_bpb`` (bits per byte) compares across tokenizers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional

from .data import load_corpus
from .train import (
    LOCK_FILE,
    RunFolder,
    TrainConfig,
    atomic_write_bytes,
    atomic_write_text,
    environment,
    read_json,
    read_metrics,
    train,
)
from .zoo import check_weight_decay, get_entry, parse_optimizer_list

SWEEP_MULTIPLIERS = (0.5, 1.0, 2.0)  # around each entry's per-size default learning rate
MAX_LR_EXTENSIONS = 2  # compare --sweep: points added beyond an end of the grid where the best lr sits


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")


def steps_for_tokens(tokens: int, cfg: TrainConfig, seq_len: int) -> int:
    per_step = cfg.batch_size * seq_len * cfg.grad_accum
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"--tokens must be a positive integer, got {tokens!r}")
    return math.ceil(tokens / per_step)  # at least one step


def _out_folder(out: Optional[str | Path], default: Path) -> Path:
    if out is None:
        return default
    if not str(out).strip():
        raise ValueError("the output folder must be named, got an empty string")
    return Path(out)


def _holds_results(out_dir: Path) -> bool:
    """Whether a failed compare/efficiency folder holds anything but its lock (runs tidy their own)."""
    return any(p.name != LOCK_FILE for p in out_dir.iterdir())


def bracketed(sweep: dict[Any, float]) -> tuple[bool, int]:
    """(is the best learning rate strictly inside the grid?, -1/+1: the side to extend, 0 when inside)."""
    lrs = sorted(float(k) for k in sweep)
    best = min(lrs, key=lambda lr: sweep.get(lr, sweep.get(str(lr), math.inf)))
    if len(lrs) < 3 or best == lrs[0]:
        return False, -1
    if best == lrs[-1]:
        return False, +1
    return True, 0


def study_config(base: TrainConfig) -> dict[str, Any]:
    """The settings every run of a study shares, for its JSON: ``base`` without the fields each run
    sets for itself (the optimizer and the seed, recorded as the study's ``optimizers``/``seeds``).
    Recording the template's own values there would name an optimizer the study never ran."""
    return {k: v for k, v in asdict(base).items() if k not in ("optimizer", "seed")}


def _run_name(optimizer: str, lr: float, seed: int, weight_decay: Optional[float] = None) -> str:
    wd = "" if weight_decay is None else f"_wd{weight_decay:g}"
    return f"{optimizer}/lr{lr:.3g}{wd}_seed{seed}"


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
    optimizers: list[str] | str = ("normuon", "adamw"),
    *,
    base: Optional[TrainConfig] = None,
    tokens: Optional[int] = None,
    sweep: bool = False,
    lr_multipliers: tuple[float, ...] = SWEEP_MULTIPLIERS,
    seeds: tuple[int, ...] = (0,),
    out: Optional[str | Path] = None,
    baseline: Optional[str] = None,
    weight_decays: tuple[float, ...] = (),
    wd_top: int = 2,
    progress: bool = True,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compare optimizers on the lab GPT and write the results folder; returns the summary.

    With ``weight_decays``, a second stage trains the ``wd_top`` best optimizers of the first (by
    mean final loss at their best lr) and the baseline again at their best lr with each weight decay
    (``TrainConfig.weight_decay``); each optimizer's result is then its best (lr, weight decay).

    The folder is locked while the comparison runs (a second comparison on it fails at once); if
    this call created it and fails before any run wrote anything, it is removed again."""
    names = parse_optimizer_list(optimizers)
    base = replace(base) if base is not None else TrainConfig()
    base.validate()
    if not seeds:
        raise ValueError("at least one seed is needed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    weight_decays = tuple(weight_decays)
    for wd in weight_decays:
        check_weight_decay(wd, "weight decays: ")
    if len(set(weight_decays)) != len(weight_decays):
        raise ValueError(f"weight decays must be distinct, got {list(weight_decays)}")
    if isinstance(wd_top, bool) or not isinstance(wd_top, int) or wd_top < 1:
        raise ValueError(f"wd_top must be a positive integer, got {wd_top!r}")
    out_dir = _out_folder(out, default_out_dir())
    from .model import GPTConfig

    seq_len = base.seq_len or GPTConfig.from_name(base.model, **base.model_overrides).seq_len
    if tokens is not None:
        base.steps = steps_for_tokens(tokens, base, seq_len)
    if baseline is None:
        baseline = next((n for n in names if n == "adamw"), None) or next(
            (n for n in names if get_entry(n).family != "muon"), names[0])
    elif baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not among the compared optimizers {names}")
    with RunFolder(out_dir, useful=_holds_results):
        return _compare(names, base, seq_len, sweep, lr_multipliers, seeds, out_dir, baseline, weight_decays, wd_top,
                        progress, report, log)


def _compare(names: list[str], base: TrainConfig, seq_len: int, sweep: bool, lr_multipliers: tuple[float, ...],
             seeds: tuple[int, ...], out_dir: Path, baseline: str, weight_decays: tuple[float, ...], wd_top: int,
             progress: bool, report: bool, log: Callable[[str], None]) -> dict[str, Any]:
    corpus = load_corpus(base.data, max_bytes=base.max_corpus_bytes, tokenizer=base.tokenizer)
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
    def run_plan(plan: list[tuple[str, float, int, Optional[float]]], stage: str) -> None:
        for i, (name, lr, seed, wd) in enumerate(plan, 1):
            # wd None: the lr sweep, at the base config's weight decay
            cfg = replace(base, optimizer=name, lr=lr, seed=seed, weight_decay=base.weight_decay if wd is None else wd)
            run_dir = out_dir / "runs" / _run_name(name, lr, seed, wd)
            log(f"[{stage}{i}/{len(plan)}] {name} lr={lr:.3g}" + ("" if wd is None else f" weight_decay={wd:g}")
                + f" seed={seed}")
            try:
                res = train(cfg, run_dir, progress=progress, corpus=corpus)
            except FloatingPointError as exc:
                log(f"  diverged: {exc}")
                res = {"finished": True, "diverged": True, "optimizer": name, "lr": lr, "seed": seed,
                       "final_val_loss": math.inf, "final_val_bpb": math.inf, "tokens": 0, "wall_time_s": 0.0}
            res = {**res, "run_dir": str(run_dir.relative_to(out_dir)), "weight_decay": wd}
            runs.setdefault(name, []).append(res)
            if not res.get("diverged"):
                log(f"  final val loss {res['final_val_loss']:.4f} ({res['final_val_bpb']:.4f} bpb)  "
                    f"({res['wall_time_s']:.1f}s, {res['step_ms']:.1f} ms/step)")

    run_plan([(name, lr, seed, None) for name, lr, seed in plan], "")
    # a swept optimizer whose best lr is at an end of its grid gets the next point out (x2 or /2), up to
    # MAX_LR_EXTENSIONS times, so that every reported optimum is inside its sweep (or says it is not)
    extended: dict[str, list[float]] = {}
    for _ in range(MAX_LR_EXTENSIONS if sweep and len(lr_multipliers) >= 3 else 0):
        more = []
        for name in names:
            means: dict[float, list[float]] = {}
            for r in runs[name]:
                if r.get("weight_decay") is None:
                    means.setdefault(r["lr"], []).append(r["final_val_loss"])
            inside, side = bracketed({lr: statistics.fmean(v) for lr, v in means.items()})
            if not inside:
                lr = min(means) / 2 if side < 0 else max(means) * 2
                extended.setdefault(name, []).append(lr)
                more += [(name, lr, seed, None) for seed in seeds]
        if not more:
            break
        log(f"muonlab compare: best lr at an end of the sweep for {', '.join(sorted({m[0] for m in more}))}: "
            f"{len(more)} more runs one step further out")
        run_plan(more, "lr+ ")
    wd_for: list[str] = []
    if weight_decays:
        first = summarize(runs, baseline, out_dir)["optimizers"]
        leaders = sorted(names, key=lambda n: first[n]["final_val_loss"])[:wd_top]
        wd_for = leaders + ([baseline] if baseline not in leaders else [])
        wd_plan = [(n, first[n]["best_lr"], seed, wd) for n in wd_for for wd in weight_decays for seed in seeds]
        log(f"muonlab compare: weight decay {list(weight_decays)} for {', '.join(wd_for)} (the {wd_top} leaders and "
            f"the baseline) at their best lr: {len(wd_plan)} more runs")
        run_plan(wd_plan, "wd ")

    log("timing one training step of each optimizer, alternating them in one process ...")
    step_ms = interleaved_step_ms(names, base)
    summary = summarize(runs, baseline, out_dir, step_ms)
    for s in summary["optimizers"].values():  # is the best lr of the lr sweep strictly inside it?
        lr_points = {p["lr"]: p["final_val_loss"] for p in s["sweep"] if p["weight_decay"] is None}
        s["lr_bracketed"] = bracketed(lr_points)[0] if sweep and len(lr_multipliers) >= 3 else None
    summary["config"] = {**study_config(base), "seeds": list(seeds), "sweep": sweep,
                         "lr_multipliers": list(lr_multipliers) if sweep else [1.0],
                         "weight_decays": list(weight_decays), "weight_decay_swept_for": wd_for,
                         "lr_extended": extended}
    summary["corpus"] = corpus.meta
    summary["tokenizer"] = corpus.tokenizer_meta
    summary["environment"] = environment()
    write_summary(summary, out_dir)
    if report:
        from .report import write_report

        path = write_report(out_dir)
        log(f"report: {path}")
    log(format_summary(summary))
    return summary


def summarize(runs: dict[str, list[dict[str, Any]]], baseline: str, out_dir: Path,
              step_ms: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Best lr per optimizer (mean final val loss over seeds), then speed-ups against the baseline.

    ``speedup_time`` is the token speed-up times the ratio of step times measured by alternating the
    optimizers in one process (``step_ms``); ``speedup_time_wallclock`` reads the separate runs' clocks,
    which only agree on a quiet machine.
    """
    per_opt: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        # (lr, weight decay); None: the zoo's weight decay (the lr sweep), a number: compare's weight-decay stage
        by_lr: dict[tuple[float, Optional[float]], list[dict[str, Any]]] = {}
        for r in results:
            by_lr.setdefault((r["lr"], r.get("weight_decay")), []).append(r)
        sweep = []
        for (lr, wd), rs in sorted(by_lr.items(), key=lambda kv: (kv[0][0], -1.0 if kv[0][1] is None else kv[0][1])):
            losses = [r["final_val_loss"] for r in rs]
            sweep.append({"lr": lr, "weight_decay": wd, "final_val_loss": statistics.fmean(losses), "seeds": len(rs),
                          "diverged": any(r.get("diverged") for r in rs)})
        best = min(sweep, key=lambda s: s["final_val_loss"])
        chosen = [r for r in by_lr[(best["lr"], best["weight_decay"])] if not r.get("diverged")]
        losses = [r["final_val_loss"] for r in chosen] or [math.inf]
        bpbs = [r.get("final_val_bpb") for r in chosen]
        per_opt[name] = {
            "optimizer": name,
            "family": get_entry(name).family,
            "best_lr": best["lr"],
            "best_weight_decay": best["weight_decay"],  # None: the zoo's (0)
            "final_val_loss": statistics.fmean(losses),
            "final_val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            # bits per byte: the same losses on a tokenizer-free axis (None for results without it)
            "final_val_bpb": statistics.fmean(bpbs) if bpbs and None not in bpbs else None,
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
    base_by_seed = {seed: read_json(out_dir / rd / "result.json", "result file")["final_val_loss"]
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
        s["speedup_time_wallclock"] = (base_s["wall_time_s"] / s["time_to_baseline_s"]) if reached and s["time_to_baseline_s"] else None
        if step_ms:
            s["step_ms_interleaved"] = step_ms[name]
        s["speedup_time"] = (s["speedup_tokens"] * step_ms[baseline] / step_ms[name]) if step_ms and s["speedup_tokens"] else None
    return {"baseline": baseline, "target_val_loss": target, "target_val_bpb": per_opt[baseline]["final_val_bpb"],
            "optimizers": per_opt}


SUMMARY_COLUMNS = ["optimizer", "best_lr", "best_weight_decay", "final_val_loss", "final_val_loss_std", "final_val_bpb", "seeds", "tokens",
                   "wall_time_s",
                   "step_ms", "step_ms_interleaved", "tokens_to_baseline", "time_to_baseline_s", "speedup_tokens",
                   "speedup_time", "speedup_time_wallclock", "optimizer_state_bytes"]


def write_summary(summary: dict[str, Any], out_dir: Path) -> None:
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    for s in summary["optimizers"].values():
        w.writerow([s.get(c) for c in SUMMARY_COLUMNS])
    atomic_write_bytes(out_dir / "summary.csv", buf.getvalue().encode("utf-8"))


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)


def format_summary(summary: dict[str, Any]) -> str:
    from .tables import format_table

    rows = []
    for s in summary["optimizers"].values():
        rows.append([
            s["optimizer"], f"{s['best_lr']:.3g}" + (" (edge)" if s.get("lr_bracketed") is False else "")
            + ("" if s.get("best_weight_decay") is None else f" wd {s['best_weight_decay']:g}"), s["final_val_loss"], "-" if s.get("final_val_bpb") is None
            else s["final_val_bpb"], s["tokens"], s["wall_time_s"],
            s.get("step_ms_interleaved", s["step_ms"]),
            "-" if s["speedup_tokens"] is None else f"{s['speedup_tokens']:.2f}x",
            "-" if s["speedup_time"] is None else f"{s['speedup_time']:.2f}x",
        ])
    head = ["optimizer", "lr", "final val loss", "val bpb", "tokens", "time (s)", "ms/step", "tokens speed-up",
            "time speed-up"]
    bpb = summary.get("target_val_bpb")
    return (f"baseline {summary['baseline']} final val loss {summary['target_val_loss']:.4f}"
            + ("" if bpb is None else f" ({bpb:.4f} bits per byte)") + "\n" + format_table(head, rows))


# ----------------------------------------------------------------------------------------------
# Sample efficiency: fully decayed runs at several budgets (never mid-schedule checkpoints)
# ----------------------------------------------------------------------------------------------

DEFAULT_FRACTIONS = (0.4, 0.5, 0.67, 0.8, 1.0)


def _interp_crossing(xs: list[float], ys: list[float], target: float) -> Optional[float]:
    """Smallest x at which the piecewise-linear curve (xs ascending) gets down to ``target``."""
    if ys[0] <= target:
        return xs[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 <= target:
            return x0 + (y0 - target) / (y0 - y1) * (x1 - x0) if y0 != y1 else x1
    return None


def efficiency(
    optimizer: str = "normuon",
    baseline: str = "adamw",
    *,
    base: Optional[TrainConfig] = None,
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    sweep: bool = True,
    lr_multipliers: tuple[float, ...] = SWEEP_MULTIPLIERS,
    seeds: tuple[int, ...] = (0, 1, 2),
    out: Optional[str | Path] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """How many tokens (and how much time) ``optimizer`` needs to match ``baseline``'s best final loss.

    The baseline trains for ``base.steps``; ``optimizer`` trains separate, fully decayed runs of
    ``f * base.steps`` steps for each fraction f. Both get an lr sweep (best by mean final loss over
    seeds, per budget). The token ratio is where the optimizer's final-loss-vs-budget curve crosses the
    baseline's final loss (linear interpolation between budgets); < 1 means fewer tokens.
    """
    parse_optimizer_list([optimizer, baseline])
    base = replace(base) if base is not None else TrainConfig()
    base.validate()
    if not fractions or any(not (0 < f <= 1.5) for f in fractions):
        raise ValueError(f"fractions must be in (0, 1.5], got {fractions}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"at least one seed is needed and seeds must be distinct, got {list(seeds)}")
    out_dir = _out_folder(out, Path("runs") / time.strftime("efficiency-%Y%m%d-%H%M%S"))
    with RunFolder(out_dir, useful=_holds_results):
        return _efficiency(optimizer, baseline, base, tuple(sorted(fractions)), sweep, lr_multipliers, seeds, out_dir,
                           progress, log)


def _efficiency(optimizer: str, baseline: str, base: TrainConfig, fractions: tuple[float, ...], sweep: bool,
                lr_multipliers: tuple[float, ...], seeds: tuple[int, ...], out_dir: Path, progress: bool,
                log: Callable[[str], None]) -> dict[str, Any]:
    corpus = load_corpus(base.data, max_bytes=base.max_corpus_bytes, tokenizer=base.tokenizer)

    def run_set(name: str, steps: int) -> dict[str, Any]:
        default_lr = get_entry(name).lr_for(base.model)
        lrs = [default_lr * m for m in lr_multipliers] if sweep else [default_lr]
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for lr in lrs:
            for seed in seeds:
                cfg = replace(base, optimizer=name, lr=lr, seed=seed, steps=steps,
                              eval_every=max(1, steps // 4), checkpoint_every=max(1, steps // 2))
                rd = out_dir / "runs" / f"{name}_{steps}steps" / f"lr{lr:.3g}_seed{seed}"
                try:
                    res = train(cfg, rd, progress=progress, corpus=corpus)
                except FloatingPointError:
                    res = {"final_val_loss": math.inf, "final_val_bpb": math.inf, "wall_time_s": math.inf, "tokens": 0,
                           "seed": seed}
                by_lr.setdefault(lr, []).append(res)
        best_lr = min(by_lr, key=lambda lr: statistics.fmean(r["final_val_loss"] for r in by_lr[lr]))
        rs = by_lr[best_lr]
        return {"steps": steps, "best_lr": best_lr, "tokens": rs[0]["tokens"],
                "final_val_loss": statistics.fmean(r["final_val_loss"] for r in rs),
                "final_val_bpb": statistics.fmean(r["final_val_bpb"] for r in rs),
                "per_seed_loss": {r["seed"]: r["final_val_loss"] for r in rs},
                "wall_time_s": statistics.fmean(r["wall_time_s"] for r in rs),
                "per_seed_time": {r["seed"]: r["wall_time_s"] for r in rs},
                "sweep": {lr: statistics.fmean(r["final_val_loss"] for r in v) for lr, v in by_lr.items()}}

    log(f"muonlab efficiency: {optimizer} at {list(fractions)} x {base.steps} steps vs {baseline} at {base.steps} "
        f"({len(seeds)} seeds, {'sweep' if sweep else 'default lr'}) -> {out_dir}")
    ref = run_set(baseline, base.steps)
    points = []
    for f in fractions:
        steps = max(1, round(f * base.steps))
        p = run_set(optimizer, steps)
        p["fraction"] = steps / base.steps
        points.append(p)
        log(f"  {optimizer} {steps} steps: final val loss {p['final_val_loss']:.4f} (best lr {p['best_lr']:.3g}); "
            f"{baseline} {base.steps} steps: {ref['final_val_loss']:.4f}")
    xs = [p["fraction"] for p in points]
    token_ratio = _interp_crossing(xs, [p["final_val_loss"] for p in points], ref["final_val_loss"])
    per_seed_ratio = {}
    for seed in seeds:
        r = _interp_crossing(xs, [p["per_seed_loss"][seed] for p in points], ref["per_seed_loss"][seed])
        per_seed_ratio[seed] = r
    time_ratio = None
    if token_ratio is not None:
        times = [p["wall_time_s"] for p in points]
        t = times[0] if token_ratio <= xs[0] else next(
            t0 + (token_ratio - x0) / (x1 - x0) * (t1 - t0)
            for (x0, t0), (x1, t1) in zip(zip(xs, times), zip(xs[1:], times[1:])) if x0 <= token_ratio <= x1)
        time_ratio = t / ref["wall_time_s"]
    ok = [v for v in per_seed_ratio.values() if v is not None]
    step_ms = interleaved_step_ms([optimizer, baseline], base)
    step_ratio = step_ms[optimizer] / step_ms[baseline]
    result = {
        "optimizer": optimizer, "baseline": baseline, "model": base.model, "baseline_steps": base.steps,
        "baseline_result": ref, "points": points, "token_ratio": token_ratio, "time_ratio": time_ratio,
        "token_speedup": (1 / token_ratio) if token_ratio else None,
        # wall-clock ratio of the separate runs (only meaningful on a quiet machine)
        "time_speedup_wallclock": (1 / time_ratio) if time_ratio else None,
        # tokens ratio x step-time ratio measured by alternating steps in one process (robust to load)
        "interleaved_step_ms": step_ms, "step_time_ratio": step_ratio,
        "time_ratio_interleaved": token_ratio * step_ratio if token_ratio else None,
        "time_speedup": 1 / (token_ratio * step_ratio) if token_ratio else None,
        "per_seed_token_ratio": per_seed_ratio,
        "per_seed_token_ratio_mean": statistics.fmean(ok) if ok else None,
        "per_seed_token_ratio_std": statistics.stdev(ok) if len(ok) > 1 else 0.0,
        "seeds": list(seeds), "config": study_config(base), "environment": environment(),
        "lr_multipliers": list(lr_multipliers) if sweep else [1.0],
    }
    # is each best lr inside its grid? (the baseline's, and the optimizer's at the full budget)
    full = min(points, key=lambda p: abs(p["fraction"] - 1.0))
    result["optimizer_full_budget_lr"] = full["best_lr"]
    for who, swept in (("baseline", ref), ("optimizer", full)):
        inside, side = bracketed(swept["sweep"]) if sweep else (True, 0)
        result[f"{who}_lr_bracketed"] = inside
        result[f"{who}_lr_edge"] = side  # -1: at the low end of the grid, +1: at the high end, 0: inside
        if not inside:
            name = baseline if who == "baseline" else optimizer
            log(f"  warning: {name}'s best lr {swept['best_lr']:.3g} is at the {'low' if side < 0 else 'high'} end of "
                f"its sweep {sorted(float(k) for k in swept['sweep'])}; widen it (--lr-multipliers) to bracket it")
    atomic_write_text(out_dir / "efficiency.json", json.dumps(result, indent=2, default=str))
    _plot_efficiency(result, out_dir / "efficiency.png")
    tr = "not reached" if token_ratio is None else f"{token_ratio:.3f}x tokens ({1 / token_ratio:.2f}x fewer)"
    ti = "-" if token_ratio is None else (
        f"{token_ratio * step_ratio:.3f}x time ({1 / (token_ratio * step_ratio):.2f}x faster; step time ratio "
        f"{step_ratio:.3f} measured interleaved; separate-run wall clock gives "
        + ("-" if time_ratio is None else f"{time_ratio:.3f}x") + ")")
    log(f"{optimizer} matches {baseline}'s final loss {ref['final_val_loss']:.4f} with {tr}, {ti}; "
        f"per-seed token ratio {result['per_seed_token_ratio_mean']} ± {result['per_seed_token_ratio_std']:.3f}")
    return result


def interleaved_step_ms(names: list[str], base: TrainConfig, steps: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median training-step time of each optimizer, measured by alternating their steps in one process.

    Wall-clock totals of separate runs are only comparable on a quiet machine; alternating steps
    exposes every optimizer to the same background load, so their ratio is what to quote.
    """
    import torch

    from .model import GPT
    from .train import forward_backward, model_config, resolve_device
    from .zoo import build_optimizer

    corpus = load_corpus(base.data, max_bytes=base.max_corpus_bytes, tokenizer=base.tokenizer)
    mcfg = model_config(base, corpus.vocab_size)
    seq_len = base.seq_len or mcfg.seq_len
    device = resolve_device(base.device)
    setups = []
    for name in names:
        torch.manual_seed(base.seed)
        model = GPT(mcfg).to(device)
        opt = build_optimizer(name, model, size=base.model, **base.optimizer_options)
        setups.append((name, model, opt, get_entry(name)))
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + steps):
        x, y = corpus.get_batch("train", base.batch_size, seq_len, seed=base.seed, step=i)
        x, y = x.to(device), y.to(device)
        for name, model, opt, entry in setups:
            t0 = time.perf_counter()
            forward_backward(model, x, y, entry, autocast=device.type == "cuda")  # the same step as train()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {n: 1e3 * statistics.median(v) for n, v in times.items()}


def _plot_efficiency(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    pts = result["points"]
    ax.plot([p["tokens"] for p in pts], [p["final_val_loss"] for p in pts], "o-", color="#d62728",
            label=f"{result['optimizer']} (fully decayed run per budget)")
    ref = result["baseline_result"]
    ax.axhline(ref["final_val_loss"], color="#1f77b4", ls="--", label=f"{result['baseline']} final loss at {ref['tokens']:,} tokens")
    ax.axvline(ref["tokens"], color="#1f77b4", ls=":", lw=0.8)
    ax.set_xlabel("training tokens (budget)")
    ax.set_ylabel("final validation loss")
    tr = result["token_ratio"]
    ax.set_title(f"{result['model']}: tokens to match {result['baseline']}: "
                 + ("not reached" if tr is None else f"{tr:.2f}x ({1 / tr:.2f}x fewer)"))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
