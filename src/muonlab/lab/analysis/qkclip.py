"""QK-Clip demonstration: one run pushed until its attention logits explode, with and without QK-Clip.

Issue 15 asks for "a run pushed until its logits explode (high lr, small model) with and without
QK-Clip: the max logit over steps, the loss, and the clipped run staying at or under tau".
``muonlab qk-clip-demo`` trains the lab GPT twice with the lab trainer, identical in everything (seed,
data order, initialisation, schedule) but ``TrainConfig.qk_clip``: ``inf`` (the max logit is measured
and logged, nothing is clipped, training is bit-identical to a run without QK-Clip) and ``tau``.

What the logged number means (Kimi K2, arXiv 2507.20534, Algorithm 1): ``max_attn_logit`` of step k
is the largest pre-softmax logit of step k's forward pass, measured on the weights *before* step k's
update and clip. The clip then scales the heads over tau by tau / S_h, computed from that measurement,
but it scales weights the update has already moved. So the clipped run's logged values sit at tau
times the growth of one update, not at tau. To show that honestly, the demo also *probes* a few
steps: it stops the run after step k (the trainer's resumable ``stop_after``; a resumed run is
bit-identical), loads the checkpoint (the weights after step k's update and clip) and measures the
max logit again on step k's own batch. And it measures the final weights on the validation batches.

Every number comes from files: each run's ``metrics.jsonl`` and checkpoints, and ``probes.json`` in
its folder; ``qkclip_demo.json`` gathers them and the PNG is drawn from that JSON. Re-running the
command with the same settings reuses (or resumes) the runs in the output folder.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

# The demonstration's settings (docs/qkclip.md, "Demonstration"): Muon at 10x its tiny-model default
# lr (0.02), AdamW part at its default, constant lr after a short warmup, tau = 30 (above the 22 the
# default lr reaches in the same 150 steps, so a healthy run would never be clipped).
DEFAULTS: dict[str, Any] = dict(model="tiny", optimizer="muon", lr=0.2, adamw_lr=None, tau=30.0, steps=150,
                                batch_size=8, seq_len=64, warmup=10, seed=0, probes=4)
RUN_NAMES = ("unclipped", "clipped")
SEMANTICS = ("max_attn_logit of step k is measured on step k's forward pass, before step k's update and "
             "clip (Kimi K2, Algorithm 1). The clip scales each head over tau by tau/S_h from that "
             "measurement, applied to weights the update has already moved, so the clipped run's logged "
             "values sit at tau times one update's growth. probes: the max logit re-measured on step k's own "
             "batch with the weights after step k's update and clip (its checkpoint).")


def demo_configs(*, model: str = DEFAULTS["model"], optimizer: str = DEFAULTS["optimizer"],
                 lr: Optional[float] = DEFAULTS["lr"], adamw_lr: Optional[float] = DEFAULTS["adamw_lr"],
                 tau: float = DEFAULTS["tau"], steps: int = DEFAULTS["steps"],
                 batch_size: int = DEFAULTS["batch_size"], seq_len: Optional[int] = DEFAULTS["seq_len"],
                 warmup: float = DEFAULTS["warmup"], seed: int = DEFAULTS["seed"], data: Optional[str] = None,
                 max_corpus_bytes: int = 8 * 2**20, eval_every: Optional[int] = None, eval_batches: int = 8,
                 ) -> tuple[Any, Any]:
    """The two TrainConfigs of the demonstration: ``qk_clip=inf`` (measure only) and ``qk_clip=tau``,
    equal in every other field. A constant schedule after ``warmup``, so the high lr keeps pushing."""
    from muonlab.lab.train import TrainConfig

    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau < math.inf):
        raise ValueError(f"tau must be a positive finite number (the clipped run's threshold), got {tau!r}")
    base = TrainConfig(model=model, optimizer=optimizer, lr=lr, adamw_lr=adamw_lr, steps=steps, batch_size=batch_size,
                       seq_len=seq_len, schedule="constant", warmup=warmup, seed=seed, data=data,
                       max_corpus_bytes=max_corpus_bytes, eval_batches=eval_batches,
                       eval_every=eval_every if eval_every is not None else max(1, steps // 10),
                       checkpoint_every=steps if isinstance(steps, int) and steps >= 1 else 1)
    unclipped, clipped = replace(base, qk_clip=math.inf), replace(base, qk_clip=float(tau))
    unclipped.validate()
    clipped.validate()
    return unclipped, clipped


def probe_steps(steps: int, n: int) -> list[int]:
    """``n`` steps spread evenly over (0, steps], the last one included: where the runs are re-measured."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of probes must be an integer >= 0, got {n!r}")
    if n > steps:
        raise ValueError(f"cannot probe {n} steps of a {steps}-step run; use at most {steps}")
    return sorted({max(1, round(steps * i / n)) for i in range(1, n + 1)})


# ------------------------------------------------------------------------------ measuring weights
def _load_model(cfg: Any, run_dir: Path) -> tuple[Any, int]:
    """The lab GPT with the weights of ``run_dir``'s newest checkpoint, on the CPU, and its step."""
    from muonlab.lab.model import GPT, GPTConfig
    from muonlab.lab.train import load_checkpoint

    found = load_checkpoint(run_dir, torch.device("cpu"))
    if found is None:
        raise RuntimeError(f"{run_dir} has no checkpoint to measure")
    ckpt, _ = found
    model = GPT(GPTConfig.from_name(cfg.model, **cfg.model_overrides))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, int(ckpt["step"])


def max_logits_on(model: Any, batches: list[torch.Tensor]) -> dict[str, list[float]]:
    """Per layer, the per-head max pre-softmax logit over ``batches`` (float32, no autocast)."""
    with torch.no_grad(), model.track_max_logits() as max_logits:
        for x in batches:
            model(x)
    return {name: [float(v) for v in t] for name, t in max_logits.items()}


def _train_batches(cfg: Any, corpus: Any, step: int) -> list[torch.Tensor]:
    """The inputs of training step ``step`` (1-based), as the trainer drew them."""
    seq_len = cfg.seq_len or _model_seq_len(cfg)
    return [corpus.get_batch("train", cfg.batch_size, seq_len, seed=cfg.seed, step=(step - 1) * cfg.grad_accum + m)[0]
            for m in range(cfg.grad_accum)]


def _model_seq_len(cfg: Any) -> int:
    from muonlab.lab.model import GPTConfig

    return GPTConfig.from_name(cfg.model, **cfg.model_overrides).seq_len


def _checkpoint_step(run_dir: Path) -> int:
    from muonlab.lab.train import load_checkpoint

    if not run_dir.exists():
        return 0
    found = load_checkpoint(run_dir, torch.device("cpu"))
    return int(found[0]["step"]) if found is not None else 0


def train_with_probes(cfg: Any, run_dir: Path, steps: list[int], corpus: Any, *, progress: bool = True,
                      log: Optional[Callable[[str], None]] = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train ``cfg`` in ``run_dir`` (resuming or reusing what is there), stopping after each step of
    ``steps`` to re-measure the max logit on that step's batch with the weights its checkpoint holds
    (after the update and the clip). Probes are kept in ``run_dir/probes.json``; a probe whose step the
    run has already passed (a folder from another probe count) is skipped with a warning.
    Returns (the trainer's result, the probes in step order)."""
    from muonlab.lab.train import atomic_write_text, read_json, train

    path = run_dir / "probes.json"
    probes: dict[str, Any] = {}
    if path.exists():
        saved = read_json(path, "probe file")
        if saved.get("config_key") == cfg.key():
            probes = saved.get("probes", {})
    for p in steps:
        if str(p) in probes:
            continue
        at = _checkpoint_step(run_dir)
        if at > p:
            warnings.warn(f"{run_dir} is past step {p} (checkpoint of step {at}): that probe is skipped; delete the "
                          "folder to measure it", stacklevel=2)
            continue
        if at < p:
            train(cfg, run_dir, stop_after=p - at, corpus=corpus, progress=progress)
        model, got = _load_model(cfg, run_dir)
        if got != p:  # pragma: no cover - the trainer checkpoints where it stops
            raise RuntimeError(f"{run_dir}: expected the checkpoint of step {p}, found step {got}")
        layers = max_logits_on(model, _train_batches(cfg, corpus, p))
        probes[str(p)] = {"step": p, "after_clip_same_batch": max(max(v) for v in layers.values()),
                          "layer_max": {k: max(v) for k, v in layers.items()}}
        atomic_write_text(path, json.dumps({"config_key": cfg.key(), "probes": probes}, indent=1))
    result = train(cfg, run_dir, corpus=corpus, progress=progress, log=log)
    return result, [probes[k] for k in sorted(probes, key=int)]


# ------------------------------------------------------------------------------ the summary
def _series(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    train_rows = [r for r in rows if r.get("kind") == "train"]
    return {"step": [r["step"] for r in train_rows], "max_attn_logit": [r["max_attn_logit"] for r in train_rows],
            "loss": [r["loss"] for r in train_rows], "qk_clipped_heads": [r["qk_clipped_heads"] for r in train_rows],
            "qk_min_gamma": [r["qk_min_gamma"] for r in train_rows]}


def summarize_run(series: dict[str, list[Any]], evals: dict[str, list[Any]], tau: float, total_heads: int
                  ) -> dict[str, Any]:
    """The numbers the docs quote, from one run's per-step series. ``tau`` is the demo's threshold
    (for the unclipped run too: how far past it the run went)."""
    logits, losses, steps = series["max_attn_logit"], series["loss"], series["step"]
    peak = max(logits)
    over = [s for s, v in zip(steps, logits) if v > tau]
    tail = max(1, len(losses) // 10)
    clipped = series["qk_clipped_heads"]
    return {
        "peak_max_attn_logit": peak,
        "peak_step": steps[logits.index(peak)],
        "peak_over_tau": peak / tau,
        "final_max_attn_logit": logits[-1],
        "steps_over_tau": len(over),
        "first_step_over_tau": over[0] if over else None,
        # the typical logged value once the run first went past tau (for the clipped run: where the clip holds it)
        "median_max_attn_logit_after_first_over_tau": (
            statistics.median(logits[steps.index(over[0]):]) if over else None),
        "final_loss": losses[-1],
        "final_loss_mean_last": sum(losses[-tail:]) / tail,
        "final_loss_mean_steps": tail,
        "final_val_loss": evals["val_loss"][-1] if evals["val_loss"] else None,
        "steps_with_clipped_heads": sum(1 for c in clipped if c > 0),
        "clipped_head_steps": sum(clipped),
        "max_clipped_heads": max(clipped),
        "total_heads": total_heads,
        "min_gamma": min(series["qk_min_gamma"]),
    }


def collect(cfgs: dict[str, Any], out: Path, probes: dict[str, list[dict[str, Any]]],
            results: dict[str, dict[str, Any]], val_logits: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """The demo's JSON: settings, each run's per-step series, probes and summary, and the comparison."""
    from muonlab.lab.model import GPTConfig
    from muonlab.lab.train import read_metrics

    clipped_cfg = cfgs["clipped"]
    tau = float(clipped_cfg.qk_clip)
    mcfg = GPTConfig.from_name(clipped_cfg.model, **clipped_cfg.model_overrides)
    total_heads = mcfg.n_layer * mcfg.n_head
    runs: dict[str, Any] = {}
    for name in RUN_NAMES:
        cfg = cfgs[name]
        rows = read_metrics(out / run_folder(name, cfg))
        series = _series(rows)
        evals = {"step": [r["step"] for r in rows if r.get("kind") == "eval"],
                 "val_loss": [r["val_loss"] for r in rows if r.get("kind") == "eval"]}
        by_step = dict(zip(series["step"], series["max_attn_logit"]))
        run_probes = [{**p, "logged_before": by_step.get(p["step"]), "next_logged": by_step.get(p["step"] + 1)}
                      for p in probes[name]]
        summary = summarize_run(series, evals, tau, total_heads)
        summary["final_weights_val_max_logit"] = max(max(v) for v in val_logits[name].values())
        summary["wall_time_s"] = results[name].get("wall_time_s")
        runs[name] = {"qk_clip": "inf" if math.isinf(cfg.qk_clip) else cfg.qk_clip,
                      "folder": run_folder(name, cfg), "config_key": cfg.key(),
                      "series": series, "eval": evals, "probes": run_probes,
                      "final_weights_val_layer_max": {k: max(v) for k, v in val_logits[name].items()},
                      "summary": summary}
    settings = {k: v for k, v in asdict(clipped_cfg).items() if k not in ("qk_clip", "tensorboard", "device")}
    settings["tau"] = tau
    settings["seq_len"] = clipped_cfg.seq_len or mcfg.seq_len
    u, c = runs["unclipped"]["summary"], runs["clipped"]["summary"]
    return {
        "settings": settings,
        "model": {"n_layer": mcfg.n_layer, "n_head": mcfg.n_head, "n_kv_head": mcfg.n_kv_head,
                  "head_dim": mcfg.head_dim, "parameters": results["clipped"].get("n_params")},
        "semantics": SEMANTICS,
        "runs": runs,
        "summary": {
            "tau": tau,
            "unclipped_peak_max_attn_logit": u["peak_max_attn_logit"],
            "clipped_peak_max_attn_logit": c["peak_max_attn_logit"],
            "clipped_steps_logged_over_tau": c["steps_over_tau"],
            "clipped_peak_over_tau": c["peak_over_tau"],
            "clipped_probe_after_clip_max": max((p["after_clip_same_batch"] for p in runs["clipped"]["probes"]),
                                                default=None),
            "unclipped_final_loss": u["final_loss_mean_last"], "clipped_final_loss": c["final_loss_mean_last"],
            "unclipped_final_val_loss": u["final_val_loss"], "clipped_final_val_loss": c["final_val_loss"],
            "clipped_head_steps": c["clipped_head_steps"], "steps_with_clipped_heads": c["steps_with_clipped_heads"],
        },
    }


def run_folder(name: str, cfg: Any) -> str:
    """The run's folder under the demo's output folder: named by role and config key (a changed
    setting trains anew; the same settings reuse the run)."""
    return f"{name}-{cfg.key()}"


def run_demo(cfgs: tuple[Any, Any], out: Path, *, probes: int = DEFAULTS["probes"], progress: bool = True,
             log: Optional[Callable[[str], None]] = None, corpus: Any = None) -> dict[str, Any]:
    """Train (or reuse) both runs under ``out``, probe them, and return the demo's JSON data."""
    from muonlab.lab.data import load_corpus

    unclipped, clipped = cfgs
    named = {"unclipped": unclipped, "clipped": clipped}
    steps = probe_steps(clipped.steps, probes)
    out = Path(out)
    corpus = corpus or load_corpus(clipped.data, max_bytes=clipped.max_corpus_bytes)
    results, all_probes, val_logits = {}, {}, {}
    for name, cfg in named.items():
        if log:
            log(f"{name} run (qk_clip={cfg.qk_clip:g}) in {out / run_folder(name, cfg)}")
        results[name], all_probes[name] = train_with_probes(cfg, out / run_folder(name, cfg), steps, corpus,
                                                            progress=progress, log=log)
        model, _ = _load_model(cfg, out / run_folder(name, cfg))
        seq_len = cfg.seq_len or _model_seq_len(cfg)
        val = [x for x, _ in corpus.val_batches(cfg.batch_size, seq_len, cfg.eval_batches)]
        val_logits[name] = max_logits_on(model, val)
    return collect(named, out, all_probes, results, val_logits)


# ------------------------------------------------------------------------------ outputs
def table_rows(data: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name in RUN_NAMES:
        r = data["runs"][name]
        s = r["summary"]
        rows.append([f"{name} (qk_clip={r['qk_clip']})", s["peak_max_attn_logit"], s["final_max_attn_logit"],
                     s["steps_over_tau"], s["final_weights_val_max_logit"], s["final_loss_mean_last"],
                     s["final_val_loss"], s["clipped_head_steps"]])
    return rows


def table_headers(data: dict[str, Any]) -> list[str]:
    tau, tail = data["summary"]["tau"], data["runs"]["clipped"]["summary"]["final_loss_mean_steps"]
    return ["run", "peak max logit", "last logged", f"steps logged > tau={tau:g}", "final weights on val",
            f"train loss (last {tail})", "final val loss", "clipped head-steps"]


def probe_rows(data: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name in RUN_NAMES:
        for p in data["runs"][name]["probes"]:
            nxt = p["next_logged"]
            rows.append([name, p["step"], p["logged_before"], p["after_clip_same_batch"],
                         nxt if nxt is not None else "-"])
    return rows


PROBE_HEADERS = ["run", "step k", "logged at k (before update+clip)", "after update+clip, same batch",
                 "logged at k+1 (next batch)"]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


_COLORS = {"unclipped": "tab:red", "clipped": "tab:blue"}


def plot_demo(data: dict[str, Any], path: Path) -> None:
    """Top: the logged max logit per step of both runs (log scale), tau dashed, the probes marked.
    Bottom: the training loss (thin: per step; thick: moving average) and the validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau, st = data["summary"]["tau"], data["settings"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for name in RUN_NAMES:
        run = data["runs"][name]
        s, color = run["series"], _COLORS[name]
        label = "no clip (qk_clip=inf)" if name == "unclipped" else f"QK-Clip tau={tau:g}"
        top.semilogy(s["step"], s["max_attn_logit"], color=color, lw=1.6,
                     label=f"{label}: peak {run['summary']['peak_max_attn_logit']:.1f}")
        if run["probes"]:
            top.scatter([p["step"] for p in run["probes"]], [p["after_clip_same_batch"] for p in run["probes"]],
                        marker="x", color=color, s=40, zorder=3,
                        label=f"{label}: after the step's update{' and clip' if name == 'clipped' else ''}, same batch")
        window = max(1, len(s["loss"]) // 15)
        bottom.plot(s["step"], s["loss"], color=color, lw=0.6, alpha=0.35)
        bottom.plot(s["step"], _moving_average(s["loss"], window), color=color, lw=1.8,
                    label=f"{label}: train loss ({window}-step mean)")
        ev = run["eval"]
        bottom.plot(ev["step"], ev["val_loss"], color=color, ls="none", marker="o", ms=4,
                    label=f"{label}: val loss, final {run['summary']['final_val_loss']:.3f}")
    top.axhline(tau, color="black", ls="--", lw=1.2, label=f"tau = {tau:g}")
    top.set_ylabel("max pre-softmax attention logit\n(logged: step's forward, before its clip)")
    top.grid(True, which="both", ls="--", alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    lr = st["lr"] if st["lr"] is not None else "default"
    warm = f"{st['warmup']:g}-step" if st["warmup"] >= 1 or st["warmup"] == 0 else f"{st['warmup']:.0%}"
    top.set_title(f"QK-Clip on the lab GPT '{st['model']}' ({data['model']['parameters']:,} parameters): "
                  f"{st['optimizer']} lr {lr}, constant after a {warm} warmup,\n"
                  f"batch {st['batch_size']} x {st['seq_len']} tokens, seed {st['seed']}, same data and init",
                  fontsize=10)
    # the scale of the training after its first tenth: the first steps' losses (5.5 nats) would flatten it
    shown, low = [], []
    for name in RUN_NAMES:
        run = data["runs"][name]
        loss = run["series"]["loss"]
        smooth = _moving_average(loss, max(1, len(loss) // 15))
        shown += smooth[len(smooth) // 10:] + [v for s, v in zip(run["eval"]["step"], run["eval"]["val_loss"]) if s > 0]
        low += loss + run["eval"]["val_loss"]
    bottom.set_ylim(min(low) - 0.05, max(shown) + 0.25)
    bottom.set_xlabel("step")
    bottom.set_ylabel("loss (nats/byte)")
    bottom.grid(True, ls="--", alpha=0.3)
    bottom.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_demo(data: dict[str, Any], out: Path, name: str = "qkclip_demo") -> tuple[Path, Path]:
    """Write ``out/<name>.json`` and draw ``out/<name>.png`` from it."""
    from muonlab.lab.train import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png, js = out / f"{name}.png", out / f"{name}.json"
    atomic_write_text(js, json.dumps(data, indent=1))
    plot_demo(json.loads(js.read_text()), png)  # drawn from the file's content
    return png, js
