"""Optimizer-state memory of every zoo optimizer for a lab model, measured and expected.

For each zoo entry we build the optimizer for a fresh lab GPT, run one real step (forward, backward,
``opt.step()``) and add up the bytes of every tensor in ``opt.state`` (nested lists and dicts
included, each storage once, parameters themselves excluded). Beside it stand two expectations, as
multiples of the parameter bytes:

* ``seed``: the nominal multiple of seed 004's table 8-1 (SGD+momentum 1x, AdamW 2x, Adafactor
  "< 1.1x", LAMB 2x, Lion 1x, Sophia 2x, Muon 1x) or the textbook value for entries it does not list;
* ``expected``: an exact element count for *this* implementation, from the parameter shapes and
  muonlab's routing (e.g. Muon: 1 x its matrices + 2 x the AdamW part; Adafactor: rows + columns of
  each matrix; Shampoo: momentum + two d x d statistics per dimension).

Measured minus expected is then only per-parameter scalars (``step`` counters, LAMB's norms), which
are reported separately. Every row also gives its state as a multiple of AdamW's fp32 state on the
same model (``x AdamW``), and each muonlab ``Muon`` entry is measured a second time with
``state_dtype="bf16"`` (issue 15: momentum and AdamW moments in bf16), reported as
``bf16 state x AdamW``. ``muonlab memory --model tiny`` prints the table, writes CSV and JSON, and
draws a bar chart.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn


@dataclass
class MemoryRow:
    name: str
    family: str
    status: str  # "ok" or "skipped"
    note: str = ""
    optimizer_class: str = ""
    param_bytes: int = 0
    state_bytes: Optional[int] = None  # all tensors in opt.state after one step
    scalar_bytes: Optional[int] = None  # the part held in 0-d tensors (step counters, norms)
    measured_x: Optional[float] = None  # state_bytes / param_bytes
    expected_bytes: Optional[int] = None  # array state this implementation should hold (no scalars)
    expected_x: Optional[float] = None
    expected_formula: str = ""
    seed_x: str = ""  # nominal multiple from seed 004 (or the textbook)
    seed_x_value: Optional[float] = None
    by_key: dict[str, int] = field(default_factory=dict)  # bytes per state key
    step_time_s: Optional[float] = None
    vs_adamw: Optional[float] = None  # state_bytes / torch.optim.AdamW's fp32 state on the same model
    bf16_state_bytes: Optional[int] = None  # muonlab Muon entries: the same optimizer with state_dtype="bf16"
    bf16_vs_adamw: Optional[float] = None
    bf16_by_key: dict[str, int] = field(default_factory=dict)


# seed 004, table 8-1 ("内存复杂度"), and textbook values for entries the table does not list
SEED_MULTIPLES: dict[str, tuple[str, Optional[float], str]] = {
    "sgd": ("0x", 0.0, "textbook: plain SGD keeps no state"),
    "sgd-momentum": ("1x", 1.0, "seed 004"),
    "nesterov": ("1x", 1.0, "seed 004 (SGD+Momentum)"),
    "adamw": ("2x", 2.0, "seed 004"),
    "adam": ("2x", 2.0, "seed 004 (AdamW row)"),
    "adagrad": ("1x", 1.0, "textbook: sum of squared gradients"),
    "rmsprop": ("1x", 1.0, "textbook: EMA of squared gradients"),
    "adafactor": ("<1.1x", 1.1, "seed 004: factored second moment"),
    "lion": ("1x", 1.0, "seed 004"),
    "lamb": ("2x", 2.0, "seed 004"),
    "lars": ("1x", 1.0, "textbook: momentum"),
    "sophia": ("2x", 2.0, "seed 004"),
    "shampoo": ("L, R + M", None, "seed 004 §7.3: L and R statistics plus momentum"),
    "soap": ("2x + L, R", None, "Adam moments in Shampoo's eigenbasis"),
}
MUON_SEED = ("1x (+2x AdamW part)", 1.0, "seed 004: 1x for Muon matrices; the AdamW part keeps 2x")


def adamw_state_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.optim.AdamW``'s state for ``model``: fp32 ``exp_avg`` and ``exp_avg_sq`` per
    element plus a 0-d fp32 ``step`` per tensor (the reference every ``x AdamW`` divides by)."""
    params = [p for _, p in unique_params(model)]
    return sum(2 * p.numel() * 4 + 4 for p in params)


def unique_params(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Trainable parameters, a tied tensor once (``named_parameters`` already deduplicates)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for _, p in unique_params(model))


def _walk(obj: Any) -> Iterator[tuple[Tensor, str]]:
    if isinstance(obj, Tensor):
        yield obj, ""
    elif isinstance(obj, dict):
        for k, v in obj.items():
            for t, _ in _walk(v):
                yield t, str(k)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)


def state_bytes(opt: torch.optim.Optimizer, exclude: Sequence[Tensor] = ()) -> tuple[int, int, dict[str, int]]:
    """(total bytes, bytes in 0-d tensors, bytes per state key) of every tensor in ``opt.state``.

    Nested lists/dicts are followed; a storage region is counted once; tensors that share storage
    with a parameter in ``exclude`` (an optimizer holding a reference to the weights) are skipped.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in exclude}
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    total = scalars = 0
    by_key: dict[str, int] = {}
    for st in opt.state.values():
        for key, value in st.items():
            for t, _ in _walk(value):
                if t.numel() == 0:
                    continue
                ptr = t.untyped_storage().data_ptr()
                if ptr in param_ptrs:
                    continue
                ident = (ptr, t.storage_offset(), tuple(t.shape), t.dtype)
                if ident in seen:
                    continue
                seen.add(ident)
                nbytes = t.numel() * t.element_size()
                total += nbytes
                if t.ndim == 0:
                    scalars += nbytes
                by_key[str(key)] = by_key.get(str(key), 0) + nbytes
    return total, scalars, by_key


# ---------------------------------------------------------------------------------------------
# Expected element counts for each zoo implementation
# ---------------------------------------------------------------------------------------------


def _routing(model: nn.Module) -> tuple[list[tuple[str, Tensor, str]], list[tuple[str, Tensor]]]:
    """(Muon matrices with their views, AdamW tensors) as muonlab routes them."""
    from muonlab import muon_param_groups

    muon, adamw = [], []
    for g in muon_param_groups(model):
        names, params = g["param_names"], g["params"]
        if g["algorithm"] == "muon":
            views = g.get("views") or [None] * len(params)
            muon.extend(zip(names, params, views))
        else:
            adamw.extend(zip(names, params))
    return muon, adamw


def _numel(ts: Sequence[Tensor]) -> int:
    return sum(t.numel() for t in ts)


def expected_elements(name: str, model: nn.Module, family: str = "") -> tuple[Optional[int], str]:
    """(state elements excluding 0-d scalars, formula) for zoo entry ``name``; (None, why) if unknown."""
    from muonlab.views import auto_view, matrix_shapes

    params = [p for _, p in unique_params(model)]
    n = _numel(params)
    muon, adamw = _routing(model)
    n_muon, n_adamw = _numel([p for _, p, _ in muon]), _numel([p for _, p in adamw])
    if name == "sgd":
        return 0, "0"
    if name in ("sgd-momentum", "nesterov", "lars", "lion", "adagrad", "rmsprop"):
        return n, "N (one buffer)"
    if name in ("adamw", "adam", "lamb"):
        return 2 * n, "2N (m, v)"
    if name == "sophia":
        return 3 * n, "3N (m, Hessian EMA, last Hessian estimate)"
    if name == "adafactor":
        total = sum((p.shape[-2] + p.shape[-1]) * math.prod(p.shape[:-2]) if p.ndim >= 2 else p.numel() for p in params)
        return total, "Σ(rows + cols) for matrices + N for vectors"
    if name == "shampoo":
        return n + sum(2 * d * d for p in params for d in p.shape), "N (momentum) + Σ 2·d² per dimension d"
    if name == "soap":
        return 2 * n + sum(2 * d * d for p in params if p.ndim >= 2 for d in p.shape), \
            "2N (m, v) + Σ 2·d² per matrix dimension (GG, Q)"
    if name == "torch-muon":
        two_d = _numel([p for _, p, _ in muon if p.ndim == 2])
        return two_d + 2 * (n - two_d), "1·(2-D Muon matrices) + 2·(the rest, torch AdamW)"
    if family == "muon" or name.startswith("muon") or name == "normuon":
        extra, formula = 0, "1·M (momentum) + 2·A (AdamW m, v)"
        if name == "normuon":
            for _, p, view in muon:
                extra += sum(k * a for k, a, _ in matrix_shapes(tuple(p.shape), view or auto_view(p.shape)))
            formula = "1·M + Σ rows (NorMuon v) + 2·A"
        return n_muon + extra + 2 * n_adamw, formula
    return None, "no formula for this entry"


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _double_backward_ok() -> contextlib.AbstractContextManager:
    """The math SDPA kernel: CPU flash attention has no double backward (Sophia's create_graph)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()


def check_step_shape(model_name: str, batch_size: int, seq_len: int) -> None:
    """The measured step's batch must exist and fit the model's context (no silent clamping)."""
    from muonlab.lab.model import GPTConfig

    cfg = GPTConfig.from_name(model_name)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"sequence length must be a positive integer, got {seq_len!r}")
    if seq_len > cfg.seq_len:
        raise ValueError(f"sequence length {seq_len} exceeds the {model_name} model's context length {cfg.seq_len}")


def measure_entry(name: str, model_name: str = "tiny", *, batch_size: int = 2, seq_len: int = 32,
                  seed: int = 0, bf16_state: bool = True) -> MemoryRow:
    """Build zoo optimizer ``name`` for a fresh ``model_name`` GPT, take one real step, measure.

    A muonlab ``Muon`` entry is measured again with ``state_dtype="bf16"`` (``bf16_state=False``
    skips that) into ``bf16_state_bytes``; every measured row gets ``vs_adamw``."""
    row = _measure_entry(name, model_name, batch_size=batch_size, seq_len=seq_len, seed=seed)
    if row.status == "ok" and bf16_state and row.optimizer_class == "Muon":
        low = _measure_entry(name, model_name, batch_size=batch_size, seq_len=seq_len, seed=seed,
                             extra={"state_dtype": "bf16"})
        if low.status == "ok":
            row.bf16_state_bytes, row.bf16_by_key = low.state_bytes, low.by_key
            row.bf16_vs_adamw = low.vs_adamw
        else:
            row.note += f"; bf16 state: {low.note}"
    return row


def _measure_entry(name: str, model_name: str, *, batch_size: int, seq_len: int, seed: int,
                   extra: Optional[dict[str, Any]] = None) -> MemoryRow:
    from muonlab.lab.model import GPT, GPTConfig
    from muonlab.lab.zoo import build_optimizer, get_entry

    entry = get_entry(name)
    check_step_shape(model_name, batch_size, seq_len)
    cfg = GPTConfig.from_name(model_name)
    torch.manual_seed(seed)
    model = GPT(cfg)
    pbytes = param_bytes(model)
    seed_label, seed_value, seed_src = SEED_MULTIPLES.get(name, MUON_SEED if entry.family == "muon" else ("?", None, ""))
    row = MemoryRow(name, entry.family, "skipped", param_bytes=pbytes, seed_x=seed_label, seed_x_value=seed_value)
    exp, formula = expected_elements(name, model, entry.family)
    elem = next(iter(model.parameters())).element_size()
    row.expected_formula = formula
    if exp is not None:
        row.expected_bytes = exp * elem
        row.expected_x = row.expected_bytes / pbytes
    try:
        opt = build_optimizer(name, model, size=model_name, **(extra or {}))
    except ImportError as exc:
        row.note = f"not built: {exc}"
        return row
    except Exception as exc:  # a broken third-party entry must not stop the table
        row.note = f"not built: {type(exc).__name__}: {exc}"
        return row
    row.optimizer_class = type(opt).__name__
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
    t0 = time.perf_counter()
    try:
        ctx = _double_backward_ok() if entry.backward_create_graph else contextlib.nullcontext()
        with ctx, warnings.catch_warnings():
            # create_graph=True warns about the param <-> grad cycle; the grads are cleared below
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            _, loss = model(x, y)
            loss.backward(create_graph=entry.backward_create_graph)
        opt.step()
    except Exception as exc:
        row.note = f"step failed: {type(exc).__name__}: {exc}"
        return row
    finally:
        if entry.backward_create_graph:  # break the param <-> grad reference cycle
            for p in model.parameters():
                p.grad = None
    row.step_time_s = time.perf_counter() - t0
    total, scalars, by_key = state_bytes(opt, exclude=[p for _, p in unique_params(model)])
    row.status = "ok"
    row.state_bytes, row.scalar_bytes, row.by_key = total, scalars, by_key
    row.measured_x = total / pbytes
    row.vs_adamw = total / adamw_state_bytes(model)
    if seed_src:
        row.note = seed_src
    if row.expected_bytes is not None and total - scalars != row.expected_bytes:
        row.note += f"; arrays {total - scalars} B != expected {row.expected_bytes} B"
    return row


def measure_all(model_name: str = "tiny", optimizers: Optional[Sequence[str]] = None, *, batch_size: int = 2,
                seq_len: int = 32, log: Any = None) -> list[MemoryRow]:
    from muonlab.lab.zoo import ZOO

    check_step_shape(model_name, batch_size, seq_len)  # before the first entry, not inside each
    names = list(optimizers) if optimizers else list(ZOO)
    rows = []
    for name in names:
        row = measure_entry(name, model_name, batch_size=batch_size, seq_len=seq_len)
        if log is not None:
            log(f"  {name}: " + (f"{row.state_bytes:,} B ({row.measured_x:.3f}x)" if row.status == "ok" else row.note))
        rows.append(row)
    return rows


def model_summary(model_name: str) -> dict[str, Any]:
    from muonlab.lab.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(model_name))
    muon, adamw = _routing(model)
    return {
        "model": model_name,
        "parameters": sum(p.numel() for _, p in unique_params(model)),
        "param_bytes": param_bytes(model),
        "muon_matrix_elements": _numel([p for _, p, _ in muon]),
        "adamw_elements": _numel([p for _, p in adamw]),
        "param_tensors": len(unique_params(model)),
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

TABLE_HEADERS = ["optimizer", "class", "state bytes", "measured x", "expected x", "seed 004 x", "scalars B",
                 "x AdamW", "bf16 state x AdamW", "expected (this implementation)"]


def table_rows(rows: Sequence[MemoryRow]) -> list[list[Any]]:
    out = []
    for r in rows:
        if r.status != "ok":
            out.append([r.name, "-", "-", "-", "-", r.seed_x, "-", "-", "-", r.note])
            continue
        out.append([r.name, r.optimizer_class, f"{r.state_bytes:,}", f"{r.measured_x:.3f}",
                    "-" if r.expected_x is None else f"{r.expected_x:.3f}", r.seed_x, r.scalar_bytes,
                    "-" if r.vs_adamw is None else f"{r.vs_adamw:.3f}",
                    "-" if r.bf16_vs_adamw is None else f"{r.bf16_vs_adamw:.3f}",
                    r.expected_formula])
    return out


def write_csv(rows: Sequence[MemoryRow], path: Path) -> None:
    nested = ("by_key", "bf16_by_key")
    keys = [k for k in asdict(rows[0]) if k not in nested] if rows else []
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(keys + list(nested))
        for r in rows:
            d = asdict(r)
            w.writerow([d[k] for k in keys] + [json.dumps(d[k], sort_keys=True) for k in nested])


def plot_memory(rows: Sequence[MemoryRow], summary: dict[str, Any], path: Path) -> None:
    """Horizontal bars: measured state / parameter bytes, with the expected and seed multiples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    skipped = [r for r in rows if r.status != "ok"]
    fig, ax = plt.subplots(figsize=(11, 0.42 * max(len(ok), 4) + 2.2))
    ys = list(range(len(ok)))[::-1]
    colors = {"muon": "tab:purple", "adaptive": "tab:green", "sgd": "tab:blue", "sign": "tab:orange",
              "second-order": "tab:red"}
    ax.barh(ys, [r.measured_x for r in ok], color=[colors.get(r.family, "tab:gray") for r in ok], alpha=0.8,
            label="measured (after one step)")
    ex = [(y, r.expected_x) for y, r in zip(ys, ok) if r.expected_x is not None]
    ax.plot([e for _, e in ex], [y for y, _ in ex], "k|", ms=16, mew=2.2, label="expected for this implementation")
    lo = [(y, r.bf16_state_bytes / r.param_bytes) for y, r in zip(ys, ok) if r.bf16_state_bytes is not None]
    if lo:
        ax.plot([x for _, x in lo], [y for y, _ in lo], "D", color="tab:cyan", ms=7,
                label='muonlab Muon with state_dtype="bf16"')
    sd = [(y, r.seed_x_value) for y, r in zip(ys, ok) if r.seed_x_value is not None]
    ax.plot([s for _, s in sd], [y for y, _ in sd], "rx", ms=9, mew=2, label="seed 004 nominal multiple")
    xmax = max([r.measured_x for r in ok] + [1.0])
    for y, r in zip(ys, ok):
        right = max([r.measured_x, r.expected_x or 0.0, r.seed_x_value or 0.0])
        ax.text(right + xmax * 0.015, y, f"{r.measured_x:.2f}x  ({r.state_bytes / 1024:,.0f} KiB)",
                va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r.name} ({r.optimizer_class})" for r in ok], fontsize=8.5)
    ax.set_xlim(0, xmax * 1.22)
    ax.set_xlabel("optimizer state bytes / parameter bytes")
    title = (f"Optimizer state for the lab GPT '{summary['model']}': {summary['parameters']:,} parameters = "
             f"{summary['param_bytes'] / 1024:,.0f} KiB (fp32); Muon matrices {summary['muon_matrix_elements']:,}, "
             f"AdamW part {summary['adamw_elements']:,}")
    if skipped:
        title += "\nnot measured: " + ", ".join(f"{r.name} ({r.note[:60]})" for r in skipped)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="x", ls="--", alpha=0.4)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_memory(rows: Sequence[MemoryRow], summary: dict[str, Any], png: Path) -> dict[str, Path]:
    """Write ``png`` plus ``.csv`` and ``.json`` beside it; returns the three paths."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    paths = {"png": png, "csv": png.with_suffix(".csv"), "json": png.with_suffix(".json")}
    write_csv(rows, paths["csv"])
    paths["json"].write_text(json.dumps({"meta": summary, "rows": [asdict(r) for r in rows]}, indent=1))
    plot_memory(rows, summary, png)
    return paths
