"""The trainer: one optimizer, one model, one budget; seeded, resumable, metrics as JSONL.

A run directory holds:

* ``config.json``   the exact TrainConfig (and the environment) of the run;
* ``metrics.jsonl`` one JSON object per training step (``kind: "train"``) and per evaluation
  (``kind: "eval"``): the source of truth every plot is drawn from;
* ``checkpoint.pt`` the latest checkpoint (model, optimizer, scheduler, step), written atomically;
* ``result.json``   written last, when the run finished: final validation loss, tokens, time.

A run stopped at step K and resumed from its checkpoint produces bit-identical losses to an
uninterrupted run (on CPU): the data order is a pure function of (seed, step) and every piece of
state that influences the next step is in the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .data import Corpus, load_corpus
from .model import GPT, GPTConfig
from .zoo import build_optimizer, get_entry

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class TrainConfig:
    """Everything that defines a run. Two runs with equal configs produce equal results."""

    model: str = "tiny"
    optimizer: str = "muon"
    lr: Optional[float] = None  # None: the zoo's default for this model size
    adamw_lr: Optional[float] = None  # the AdamW part of Muon-style optimizers (None: zoo default)
    steps: int = 400
    batch_size: int = 16
    seq_len: Optional[int] = None  # None: the model's context length
    grad_accum: int = 1  # seed 001's accumulation_steps
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup: float = 0.05  # fraction of steps (<1) or a number of steps (>=1)
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to min_lr
    min_lr_ratio: float = 0.0  # fully decayed by default (never compare mid-schedule)
    grad_clip: Optional[float] = None
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 100
    seed: int = 0
    data: Optional[str] = None  # None: the Python standard library of this interpreter
    max_corpus_bytes: int = 8 * 2**20
    device: str = "auto"  # auto | cpu | cuda
    stats_every: int = 0  # record Muon update statistics every N steps (0: at each eval)
    tensorboard: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)
    optimizer_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        get_entry(self.optimizer)
        GPTConfig.from_name(self.model, **self.model_overrides)
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {list(SCHEDULES)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 < self.decay_fraction <= 1):
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def key(self) -> str:
        """A short hash of the config: runs are cached per configuration."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of every group's base lr at optimizer step ``step`` (0-based)."""
    total = cfg.steps
    warm = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    if warm > 0 and step < warm:
        return (step + 1) / warm
    lo = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)  # reaches 0 at step == total, after the last update
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # warmup-stable-decay: constant, then a linear decay over the last decay_fraction of steps
    decay_steps = max(1, int(round(cfg.decay_fraction * total)))
    start = total - decay_steps
    if step < start:
        return 1.0
    progress = (step - start) / decay_steps
    return lo + (1 - lo) * (1 - min(1.0, progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


class _Metrics:
    """Append-only JSONL writer that can be truncated back to a checkpoint on resume."""

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            kept = []
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a torn last line from a crash
                    if row.get("step", 0) <= resume_step:
                        kept.append(line)
            atomic_write_text(path, "".join(k + "\n" for k in kept))
        self.fh = open(path, "a")

    def write(self, row: dict[str, Any]) -> None:
        self.fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, autocast: bool) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(x.to(device), y.to(device))
        total += float(loss)
    model.train(was_training)
    return total / len(batches)


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    stop_after: Optional[int] = None,
    corpus: Optional[Corpus] = None,
    log: Any = None,
    parallel: str = "none",
) -> dict[str, Any]:
    """Train one model with one optimizer; returns the result dict (also written to result.json).

    ``stop_after=K`` stops after K optimizer steps as if interrupted (a checkpoint is written),
    which a later call with ``resume=True`` continues. ``parallel`` (``"none"``, ``"ddp"``,
    ``"fsdp"``) trains data-parallel under torchrun (see :mod:`muonlab.lab.parallel`).
    """
    from tqdm.auto import tqdm

    cfg.validate()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / "result.json"
    ckpt_path = run_dir / "checkpoint.pt"
    if resume and result_path.exists():
        done = json.loads(result_path.read_text())
        if done.get("config_key") == cfg.key():
            return done
    device = resolve_device(cfg.device)
    # --- parallel (issue 6): process group, this rank's device; only rank 0 writes and prints
    from .parallel import setup as setup_parallel

    par = setup_parallel(parallel, device)
    device, wdir = par.device, par.out_dir(run_dir)
    progress, log = progress and par.is_main, log if par.is_main else None
    # --- end parallel
    autocast = device.type == "cuda"
    entry = get_entry(cfg.optimizer)

    corpus = corpus or load_corpus(cfg.data, max_bytes=cfg.max_corpus_bytes)
    mcfg = GPTConfig.from_name(cfg.model, **cfg.model_overrides)
    seq_len = cfg.seq_len or mcfg.seq_len
    if seq_len > mcfg.seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context length {mcfg.seq_len}")
    if seq_len + 1 > len(corpus.train) or seq_len + 1 > len(corpus.val):
        raise ValueError(
            f"seq_len {seq_len} + 1 is longer than the data (train {len(corpus.train)} tokens, "
            f"validation {len(corpus.val)} tokens); use a shorter --seq-len or more data"
        )
    if cfg.batch_size * (seq_len + 1) > len(corpus.train):
        raise ValueError(
            f"batch of {cfg.batch_size} x {seq_len + 1} tokens is larger than the training data "
            f"({len(corpus.train)} tokens)"
        )

    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(device)
    model, inner = par.wrap(model)  # parallel (issue 6): DDP / FSDP2; the optimizer gets the inner module
    opt = build_optimizer(cfg.optimizer, inner, size=cfg.model, lr=cfg.lr, adamw_lr=cfg.adamw_lr, **cfg.optimizer_options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    val_batches = corpus.val_batches(cfg.batch_size, seq_len, cfg.eval_batches)

    start_step, train_time = 0, 0.0
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt.get("config_key") != cfg.key():
            raise ValueError(
                f"{ckpt_path} was written by a different configuration; use a new output folder or delete it"
            )
        par.load(model, opt, ckpt["model"], ckpt["optimizer"])  # parallel (issue 6): plain load when "none"
        sched.load_state_dict(ckpt["scheduler"])
        start_step, train_time = int(ckpt["step"]), float(ckpt["train_time_s"])
        torch.set_rng_state(ckpt["rng"])
    metrics = _Metrics(wdir / "metrics.jsonl", start_step if start_step else None)
    atomic_write_text(
        wdir / "config.json",
        json.dumps({"config": asdict(cfg), "config_key": cfg.key(), "model_config": mcfg.to_dict(),
                    "n_params": inner.num_parameters(), "corpus": corpus.meta, "environment": environment(),
                    "optimizer_description": entry.description}, indent=2, default=str),
    )
    tb = None
    if cfg.tensorboard and par.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError as exc:
            raise ImportError("--tensorboard needs the tensorboard package: pip install 'muonlab[tensorboard]'") from exc

    tokens_per_step = cfg.batch_size * seq_len * cfg.grad_accum
    track = hasattr(opt, "track_stats")
    last_val = None
    # a live bar on a terminal; one plain line per evaluation otherwise (logs, CI)
    interactive = progress and sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not interactive, desc=f"{cfg.optimizer}", unit="step",
               dynamic_ncols=True, leave=False)

    def checkpoint(step: int) -> None:
        model_sd, optim_sd = par.state(model, opt)  # parallel (issue 6): full state dicts, a collective
        if par.is_main:
            atomic_torch_save(
                {"model": model_sd, "optimizer": optim_sd, "scheduler": sched.state_dict(),
                 "step": step, "train_time_s": train_time, "rng": torch.get_rng_state(), "config_key": cfg.key()},
                ckpt_path,
            )
        par.barrier()

    if start_step == 0:
        last_val = evaluate(model, val_batches, device, autocast)
        metrics.write({"kind": "eval", "step": 0, "tokens": 0, "time_s": 0.0, "val_loss": last_val})
    model.train()
    step = start_step
    try:
        while step < cfg.steps:
            if stop_after is not None and step - start_step >= stop_after:
                break
            t0 = time.perf_counter()
            want_stats = track and (
                (cfg.stats_every and (step + 1) % cfg.stats_every == 0)
                or (not cfg.stats_every and (step + 1) % cfg.eval_every == 0)
            )
            if track:
                opt.track_stats = bool(want_stats)  # type: ignore[attr-defined]
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = corpus.get_batch("train", cfg.batch_size, seq_len, seed=cfg.seed, step=step * cfg.grad_accum + micro)
                x, y = par.shard(x.to(device), y.to(device))  # parallel (issue 6): this rank's rows
                loss = forward_backward(model, x, y, entry, autocast, cfg.grad_accum)
                loss_sum += float(loss.detach())
            train_loss = par.mean(loss_sum / cfg.grad_accum)  # parallel (issue 6): the global batch's loss
            if not math.isfinite(train_loss):
                raise FloatingPointError(
                    f"training loss became {train_loss} at step {step + 1} with {cfg.optimizer} lr={cfg.lr}; "
                    "lower the learning rate"
                )
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr_now = [g["lr"] for g in opt.param_groups]
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            train_time += dt
            step += 1
            row: dict[str, Any] = {"kind": "train", "step": step, "tokens": step * tokens_per_step, "loss": train_loss,
                                   "lr": float(lr_now[0]), "lrs": [float(v) for v in lr_now], "step_ms": dt * 1e3,
                                   "time_s": train_time}
            if want_stats and getattr(opt, "last_stats", None):
                st = opt.last_stats  # type: ignore[attr-defined]
                muon_rms = [v["update_rms"] for v in st.values() if "ortho_residual" in v]
                if muon_rms:
                    row["muon_update_rms"] = sum(muon_rms) / len(muon_rms)
                    row["ortho_residual"] = max(v["ortho_residual"] for v in st.values() if "ortho_residual" in v)
            metrics.write(row)
            if tb is not None:
                tb.add_scalar("train/loss", train_loss, step)
                tb.add_scalar("train/lr", float(lr_now[0]), step)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_val = evaluate(model, val_batches, device, autocast)
                metrics.write({"kind": "eval", "step": step, "tokens": step * tokens_per_step, "time_s": train_time,
                               "val_loss": last_val})
                if tb is not None:
                    tb.add_scalar("val/loss", last_val, step)
                if progress and not interactive:
                    eta = (cfg.steps - step) * train_time / max(1, step - start_step) if step > start_step else 0.0
                    print(f"  {cfg.optimizer} step {step}/{cfg.steps} | loss {train_loss:.3f} | val {last_val:.3f} | "
                          f"{dt * 1e3:.0f} ms | {tokens_per_step / dt / 1e3:.1f}k tok/s | eta {eta:.0f}s", flush=True)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or (stop_after is not None and step - start_step >= stop_after):
                metrics.flush()
                checkpoint(step)
            bar.update(1)
            bar.set_postfix_str(
                f"loss {train_loss:.3f}" + (f" val {last_val:.3f}" if last_val is not None else "")
                + f" {tokens_per_step / dt / 1e3:.1f}k tok/s"
            )
    finally:
        bar.close()
        metrics.close()
        if tb is not None:
            tb.close()
        par.close()  # parallel (issue 6)

    if step < cfg.steps:
        return {"finished": False, "step": step}
    result = {
        "finished": True,
        "optimizer": cfg.optimizer,
        "model": cfg.model,
        "lr": cfg.lr if cfg.lr is not None else get_entry(cfg.optimizer).lr_for(cfg.model),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "tokens": cfg.steps * tokens_per_step,
        "final_val_loss": last_val,
        "wall_time_s": train_time,
        "step_ms": 1e3 * train_time / max(1, cfg.steps - start_step) if start_step == 0 else None,
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "n_params": inner.num_parameters(),
        "config_key": cfg.key(),
    }
    if result["step_ms"] is None:  # resumed: recompute from the per-step timings
        rows = [json.loads(line) for line in (wdir / "metrics.jsonl").read_text().splitlines()]
        ms = [r["step_ms"] for r in rows if r.get("kind") == "train"]
        result["step_ms"] = sum(ms) / len(ms)
    atomic_write_text(wdir / "result.json", json.dumps(result, indent=2))
    if log:
        log(f"{cfg.optimizer}: final val loss {last_val:.4f} after {result['tokens']:,} tokens in {train_time:.1f}s")
    return result


def forward_backward(model: Any, x: Any, y: Any, entry: Any, autocast: bool, grad_accum: int = 1) -> Any:
    """One micro-batch of a training step: forward (bf16 autocast on CUDA when ``autocast``, the
    attention kernel the optimizer needs), then backward of loss / grad_accum, with the
    second-order graph for optimizers that need it (Sophia). Returns the (unscaled) loss."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast), _attention_kernel(entry):
        _, loss = model(x, y)
        (loss / grad_accum).backward(create_graph=entry.backward_create_graph)
    return loss


def _attention_kernel(entry: Any) -> Any:
    """Second-order optimizers (Sophia's Hessian estimate) need attention with a double backward,
    which only PyTorch's plain 'math' attention kernel has on CPU."""
    import contextlib

    if not entry.backward_create_graph:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows
