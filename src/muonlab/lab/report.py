"""Plots and a self-contained HTML report, drawn only from a compare folder's files.

``muonlab report DIR`` reruns this on ``DIR/summary.json`` and ``DIR/runs/*/metrics.jsonl``, so
every picture can be redrawn without retraining.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from .train import atomic_write_text, read_json, read_metrics

PLOTS = ("val_loss_vs_tokens", "val_loss_vs_time", "learning_rate", "muon_update_rms", "lr_sweep")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_summary(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {out_dir} a folder written by `muonlab compare` "
                                "(or scaling.json, by `muonlab scaling`)?")
    summary = read_json(path, "summary file")
    missing = [k for k in ("optimizers", "baseline", "target_val_loss") if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise ValueError(f"summary file {path} is not a `muonlab compare` summary (missing {', '.join(missing)})")
    return summary


def draw_plots(out_dir: Path, summary: dict[str, Any]) -> dict[str, Path]:
    """Draw the PNGs; returns {plot name: path} for the plots that have data."""
    plt = _plt()
    curves = {name: [read_metrics(out_dir / rd) for rd in s["runs"]] for name, s in summary["optimizers"].items()}
    paths: dict[str, Path] = {}
    target = summary["target_val_loss"]

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths[name] = path

    for name, key, xlabel in (("val_loss_vs_tokens", "tokens", "training tokens"),
                              ("val_loss_vs_time", "time_s", "training wall time (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for opt, runs in curves.items():
            for i, rows in enumerate(runs):
                ev = [r for r in rows if r.get("kind") == "eval" and r["step"] > 0]
                ax.plot([r[key] for r in ev], [r["val_loss"] for r in ev], marker="o", ms=3,
                        label=opt if i == 0 else None, color=_color(opt, list(curves)))
        ax.axhline(target, color="k", ls=":", lw=0.8, label=f"{summary['baseline']} final")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"validation loss vs {xlabel.split(' (')[0]}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, name)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for opt, runs in curves.items():
        rows = [r for r in runs[0] if r.get("kind") == "train"]
        ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], label=opt, color=_color(opt, list(curves)))
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate (first group)")
    ax.set_yscale("log")
    ax.set_title("learning-rate schedule")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save(fig, "learning_rate")

    have_rms = False
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for opt, runs in curves.items():
        rows = [r for r in runs[0] if "muon_update_rms" in r]
        if rows:
            have_rms = True
            ax.plot([r["step"] for r in rows], [r["muon_update_rms"] for r in rows], marker="o", ms=3, label=opt,
                    color=_color(opt, list(curves)))
    if have_rms:
        ax.set_xlabel("step")
        ax.set_ylabel("mean update RMS of Muon matrices")
        ax.set_title("Muon update RMS")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "muon_update_rms")
    else:
        plt.close(fig)

    if any(len(s["sweep"]) > 1 for s in summary["optimizers"].values()):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for opt, s in summary["optimizers"].items():
            # the lr sweep (weight-decay stage points, at one lr, are in the summary table)
            pts = [p for p in s["sweep"] if p["final_val_loss"] != float("inf") and p.get("weight_decay") is None]
            ax.plot([p["lr"] for p in pts], [p["final_val_loss"] for p in pts], marker="o", label=opt,
                    color=_color(opt, list(curves)))
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final validation loss")
        ax.set_title("learning-rate sweep")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "lr_sweep")
    return paths


def _color(name: str, names: list[str]) -> str:
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    return palette[names.index(name) % len(palette)]


def _esc(v: Any) -> str:
    """Every value that goes into the page goes through here: summary.json is data, not markup."""
    return html.escape(str(v), quote=True)


def _fmt(v: Any, kind: str = "") -> str:
    """A number formatted for the table; anything else (a string in a hand-edited or foreign
    summary.json) is shown as escaped text rather than trusted or crashed on."""
    if v is None:
        return "—"
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "x" and number:
        return f"{v:.2f}×"
    if kind == "bytes" and number:
        return f"{v / 1024:,.1f} KiB"
    if isinstance(v, float):
        return f"{v:.4g}"
    if number:
        return f"{v:,}"
    return _esc(v)


def write_report(out_dir: str | Path) -> Path:
    """Draw the plots and write ``report.html`` (images embedded, no external files): a comparison
    page for a ``muonlab compare`` folder, the scaling page for a ``muonlab scaling`` folder."""
    out_dir = Path(out_dir)
    if not (out_dir / "summary.json").exists() and (out_dir / "scaling.json").exists():
        return write_scaling_report(out_dir)
    summary = load_summary(out_dir)
    plots = draw_plots(out_dir, summary)
    rows = []
    for s in summary["optimizers"].values():
        std = s.get("final_val_loss_std")
        spread = f" ± {_fmt(std)}" if isinstance(s.get("seeds", 1), int) and s.get("seeds", 1) > 1 else ""
        ttb = s.get("tokens_to_baseline")
        rows.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in [
                _esc(s.get("optimizer")), _fmt(s.get("best_lr"))
                + (" (edge of the sweep)" if s.get("lr_bracketed") is False else "")
                + ("" if s.get("best_weight_decay") is None else f" (wd {_fmt(s.get('best_weight_decay'))})"),
                _fmt(s.get("final_val_loss")) + spread,
                _fmt(s.get("final_val_bpb")),
                _fmt(s.get("tokens")), _fmt(round(ttb) if isinstance(ttb, (int, float)) else ttb),
                _fmt(s.get("speedup_tokens"), "x"), _fmt(s.get("wall_time_s")),
                _fmt(s.get("time_to_baseline_s")), _fmt(s.get("speedup_time"), "x"),
                _fmt(s.get("step_ms_interleaved", s.get("step_ms"))),
                _fmt(s.get("optimizer_state_bytes"), "bytes"),
            ]) + "</tr>"
        )
    figs = []
    for name in PLOTS:
        if name in plots:
            data = base64.b64encode(plots[name].read_bytes()).decode()
            figs.append(f'<figure><img class="plot" alt="{_esc(name)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_esc(name.replace('_', ' '))}</figcaption></figure>")
    cfg = json.dumps({k: summary.get(k) for k in ("config", "corpus", "environment")}, indent=2, default=str)
    config = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    t = summary["target_val_loss"]
    target = f"{t:.4f}" if isinstance(t, (int, float)) and not isinstance(t, bool) else _esc(t)
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>muonlab comparison</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}} th{{background:#f3f3f3}}
.plots{{display:flex;flex-wrap:wrap;gap:1em}} figure{{margin:0}} img.plot{{max-width:580px;border:1px solid #eee}}
pre{{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}}
</style></head>
<body>
<h1>muonlab: optimizer comparison</h1>
<p>Model <b>{_esc(config.get('model'))}</b>, tokenizer <b>{_esc(config.get('tokenizer', 'bytes'))}</b>,
{_fmt(config.get('steps'))} steps per run, baseline <b>{_esc(summary['baseline'])}</b> (final validation loss {target}).
Losses are nats per token; bits per byte = loss × tokens / (bytes × ln 2) over the same evaluated text, so runs
with different tokenizers compare on it.
Token speed-up = baseline's tokens / tokens this optimizer needed to reach the baseline's final loss (same seed),
read off its validation curve. Time speed-up = token speed-up × baseline step time / this step time, with step times
measured by alternating the optimizers' training steps in one process (robust to background load); the separate
runs' wall clocks are in summary.json as <code>speedup_time_wallclock</code>.</p>
<table id="summary">
<thead><tr><th>optimizer</th><th>best lr</th><th>final val loss</th><th>val bits per byte</th><th>tokens</th><th>tokens to baseline loss</th>
<th>token speed-up</th><th>train time (s)</th><th>time to baseline loss (s)</th><th>time speed-up</th>
<th>step (ms, interleaved)</th><th>optimizer state</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<div class="plots">
{chr(10).join(figs)}
</div>
{_page_end(cfg)}"""
    return _write_page(out_dir, doc)


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0} td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left} th{background:#f3f3f3}
img.plot{max-width:700px;border:1px solid #eee}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}"""


def write_scaling_report(out_dir: str | Path) -> Path:
    """``report.html`` of a ``muonlab scaling`` folder, drawn from ``scaling.json`` alone: the speed-up
    against parameters (the plot redrawn) and one row per size."""
    from .scaling import plot_scaling

    out_dir = Path(out_dir)
    result = read_json(out_dir / "scaling.json", "scaling file")
    if not isinstance(result, dict) or not isinstance(result.get("sizes"), list) or not result["sizes"]:
        raise ValueError(f"{out_dir / 'scaling.json'} is not a `muonlab scaling` result (no sizes)")
    plot = out_dir / "scaling.png"
    plot_scaling(result, plot)
    opt, base = _esc(result.get("optimizer")), _esc(result.get("baseline"))
    rows = []
    for r in result["sizes"]:
        lr = _fmt(r.get("baseline_lr")) + ("" if r.get("baseline_lr_bracketed") else " (edge of the sweep)")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in [
            _esc(r.get("model")), _fmt(r.get("non_embedding_params")), _fmt(r.get("params")), _fmt(r.get("steps")),
            _fmt(r.get("tokens")), lr, _fmt(r.get("baseline_val_loss")), _fmt(r.get("optimizer_best_lr_full_budget"))
            + (" (edge of the sweep)" if r.get("optimizer_lr_bracketed") is False else ""),
            _fmt(r.get("token_speedup"), "x") if r.get("token_speedup") is not None else "not reached",
            _fmt(r.get("time_speedup"), "x") if r.get("time_speedup") is not None else "—",
            _esc(", ".join(str(s) for s in r.get("seeds") or [])),
            _fmt(r.get("train_time_s") / 60 if isinstance(r.get("train_time_s"), (int, float)) else None),
        ]) + "</tr>")
    data = base64.b64encode(plot.read_bytes()).decode()
    trend = ", ".join(f"{_fmt(t.get('token_speedup'), 'x')} at {_fmt(t.get('params'))}"
                      for t in result.get("published_trend") or [] if isinstance(t, dict))
    cfg = json.dumps({k: result.get(k) for k in ("config", "environment")}, indent=2, default=str)
    config = result.get("config") if isinstance(result.get("config"), dict) else {}
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>muonlab scaling study</title>
<style>
{STYLE}
</style></head>
<body>
<h1>muonlab: {opt} against {base} across model sizes</h1>
<p>Tokenizer <b>{_esc(config.get('tokenizer', 'bytes'))}</b>, {_fmt(result.get('tokens_per_param'))} training tokens per
non-embedding parameter for {base}'s runs, batch {_fmt(config.get('batch_size'))}. At every size {base} trains for the
full budget and {opt} in separate, fully decayed runs at fractions of it, both with a learning-rate sweep; the
token speed-up is where {opt}'s final-loss-against-budget curve reaches {base}'s final loss ("not reached": not within
the largest fraction run). The time speed-up multiplies it by the ratio of step times measured by alternating the
two optimizers' training steps in one process. Published trend drawn for reference
({_esc(result.get('published_trend_source'))}): {trend}.</p>
<table id="scaling">
<thead><tr><th>model</th><th>non-embedding params</th><th>params</th><th>steps</th><th>tokens</th><th>{base} lr</th>
<th>{base} final val loss</th><th>{opt} lr (full budget)</th><th>token speed-up</th><th>time speed-up</th><th>seeds</th>
<th>training (min)</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<figure><img class="plot" alt="scaling" src="data:image/png;base64,{data}"><figcaption>speed-up against
non-embedding parameters</figcaption></figure>
{_page_end(cfg)}"""
    return _write_page(out_dir, doc)


def _page_end(cfg: str) -> str:
    """The configuration block, the script with which a headless-browser test confirms that every plot
    decoded and rendered, and the end of the page."""
    return f"""<h2>Configuration and environment</h2>
<pre id="config">{_esc(cfg)}</pre>
<script>
window.addEventListener('load', () => {{
  const imgs = Array.from(document.querySelectorAll('img.plot'));
  document.body.dataset.plotsRendered = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""


def _write_page(out_dir: Path, doc: str) -> Path:
    path = out_dir / "report.html"
    atomic_write_text(path, doc)
    return path
