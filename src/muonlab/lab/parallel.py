"""Parallel training for the lab trainer: ``--parallel none|ddp|fsdp|hsdp|tp|fsdp+tp`` under torchrun.

``torchrun --nproc_per_node=4 -m muonlab train --parallel hsdp --mesh 2x2 ...`` starts one process
per rank; :func:`setup` joins the process group from torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; gloo on CPU, nccl on CUDA) with a
collective timeout (``--dist-timeout``), and builds the device mesh of the mode:

==========  ==================  ==========================================================
mode        mesh (``--mesh``)   what each rank holds
==========  ==================  ==========================================================
ddp         W                   the whole model (DistributedDataParallel)
fsdp        W                   1/W of every block and of the rest (FSDP2 ``fully_shard``)
hsdp        R x S               1/S of everything, replicated R times: ``(Replicate, Shard(0))``
tp          W                   1/W of every attention and MLP matrix (Megatron-style column /
                                row pairs); embeddings, head and norms replicated
fsdp+tp     D x T               tensor parallel over T, and FSDP2 over D on top of it
==========  ==================  ==========================================================

Data parallelism is over the ranks that hold different model replicas or shards of the data:
every rank for ddp/fsdp/hsdp, none for tp (every rank sees the whole batch), the D groups for
fsdp+tp. Each takes its rows of each global batch (global batch = ``batch_size``), so the loss
curve is the single-process one. Only rank 0 writes metrics and results; the other ranks write
nothing but their shards of the checkpoints.

Checkpoints of parallel runs are sharded ``torch.distributed.checkpoint`` (DCP) folders written by
every rank (``checkpoint.dcp/``, the previous one kept as ``checkpoint.dcp.prev/``), keyed by
parameter name, so a run resumes on another mesh, at another world size, or as one plain process.
Without torchrun's variables a single-rank group is created on a free localhost port, so every
mode also runs as one plain process.

A rank that stalls or dies makes the others stop once the collective timeout has passed, with an
error naming the stalled rank: every rank keeps a heartbeat (time and step) in the process group's
store, which the rank that hit the timeout reads.

``muonlab.Muon`` picks up the process group by itself and spreads its orthogonalizations over the
ranks (see :mod:`muonlab.distributed`).
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

MODES = ("none", "ddp", "fsdp", "hsdp", "tp", "fsdp+tp")
TWO_D = ("hsdp", "fsdp+tp")
DEFAULT_TIMEOUT_S = 600.0
SHARDED_CHECKPOINT = "checkpoint.dcp"
PREVIOUS_SHARDED_CHECKPOINT = "checkpoint.dcp.prev"
_TMP_SHARDED_CHECKPOINT = "checkpoint.dcp.tmp"
_META = "muonlab_meta.pt"  # scheduler, step, time, rng, config key: written by rank 0 beside the shards
_HEARTBEAT_S = 1.0


def parse_mesh(text: Optional[str], mode: str, world: int) -> tuple[int, ...]:
    """The mesh shape of ``mode`` at ``world`` ranks: ``"2x2"`` -> (2, 2). 1-D modes take ``W`` (or
    nothing); 2-D modes default to (W/2, 2) when W is even."""
    if mode == "none":
        if text:
            raise ValueError(f"--mesh {text} needs a parallel mode (--parallel {'|'.join(MODES[1:])})")
        return ()
    if text is None or text == "":
        if mode not in TWO_D:
            return (world,)
        if world % 2 and world != 1:
            raise ValueError(f"--parallel {mode} at {world} ranks needs --mesh AxB with A*B={world}")
        return (max(1, world // 2), 2 if world > 1 else 1)
    if not re.fullmatch(r"\s*\d+(\s*x\s*\d+)*\s*", text):
        raise ValueError(f"--mesh must look like 4 or 2x2, got {text!r}")
    shape = tuple(int(v) for v in text.lower().split("x"))
    want = 2 if mode in TWO_D else 1
    if len(shape) != want:
        raise ValueError(f"--parallel {mode} takes a {want}-D mesh ({'AxB' if want == 2 else 'W'}), got --mesh {text}")
    if any(v < 1 for v in shape):
        raise ValueError(f"--mesh sizes must be >= 1, got --mesh {text}")
    if _prod(shape) != world:
        raise ValueError(f"--mesh {text} has {_prod(shape)} ranks but the job has {world} (WORLD_SIZE)")
    return shape


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for v in shape:
        n *= v
    return n


@dataclass
class Parallel:
    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh_shape: tuple[int, ...] = ()
    owns_group: bool = False
    timeout_s: Optional[float] = None
    mesh: Any = None
    heartbeat: Optional["Heartbeat"] = None

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp_size(self) -> int:
        if self.mode == "tp":
            return self.world
        if self.mode == "fsdp+tp":
            return self.mesh_shape[1]
        return 1

    @property
    def dp(self) -> tuple[int, int]:
        """(this rank's data-parallel index, the number of data-parallel groups)."""
        tp = self.tp_size
        return self.rank // tp, self.world // tp

    def describe(self) -> dict[str, Any]:
        """What config.json records about the layout (not part of the run's key: same math)."""
        return {"mode": self.mode, "world": self.world, "mesh": list(self.mesh_shape),
                "timeout_s": self.timeout_s, "backend": dist.get_backend() if self.active else None}

    # ------------------------------------------------------------------ model and data
    def wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(the module to call, the module whose parameters the optimizer gets)."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(model, device_ids=ids), model
        if self.mode in ("fsdp", "hsdp"):
            _fully_shard(model, self.mesh)
        elif self.mode == "tp":
            tensor_parallel(model, self.mesh)
        elif self.mode == "fsdp+tp":
            tensor_parallel(model, self.mesh["tp"])
            _fully_shard(model, self.mesh["dp"])
        return model, model

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of a global batch (every tensor-parallel rank of a group takes the same rows)."""
        index, groups = self.dp
        if not self.active or groups == 1:
            return x, y
        n = x.shape[0]
        if n % groups:
            raise ValueError(f"batch size {n} is not divisible by the {groups} data-parallel groups "
                             f"(--parallel {self.mode}, mesh {'x'.join(map(str, self.mesh_shape))})")
        k = n // groups
        return x[index * k:(index + 1) * k], y[index * k:(index + 1) * k]

    def mean(self, value: float) -> float:
        """The mean of a float over ranks (the global batch's loss from per-rank losses)."""
        if not self.active or self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def first(self, text: Optional[str]) -> Optional[str]:
        """The first non-empty string over ranks (in rank order), on every rank (a collective)."""
        if not self.active or self.world == 1:
            return text
        got: list[Optional[str]] = [None] * self.world
        dist.all_gather_object(got, text)
        return next((t for t in got if t), None)

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Scale the gradients so that their global 2-norm is at most ``max_norm``; returns the norm.

        ``torch.nn.utils.clip_grad_norm_`` cannot mix DTensors of different meshes (fsdp+tp puts the
        blocks' matrices on the 2-D mesh and the embedding on its dp sub-mesh), so the norm is
        taken per mesh (DTensor reductions know which mesh dimensions hold shards and which
        replicas) and combined here."""
        from muonlab.distributed.common import is_dtensor

        grads = [p.grad for p in params if p.grad is not None]
        groups: dict[Any, list[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault(id(g.device_mesh) if is_dtensor(g) else None, []).append(g)
        total_sq = 0.0
        for key, gs in groups.items():
            n = torch.nn.utils.get_total_norm(gs, foreach=False)
            if key is not None:
                n = n.full_tensor()
            total_sq += float(n) ** 2
        total = total_sq ** 0.5
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return total

    # ------------------------------------------------------------------ checkpoints
    def state(self, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Model and optimizer state dicts: the plain ones, or, in parallel modes, this rank's
        shards keyed by parameter name (DTensors under fsdp/hsdp/tp)."""
        if not self.active:
            return model.state_dict(), opt.state_dict()
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(model, opt)

    def load(self, model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
        """Load full state dicts (a ``checkpoint.pt`` of a single-process run, read by every rank)."""
        if not self.active:
            model.load_state_dict(model_sd)
            opt.load_state_dict(optim_sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))

    def save_sharded(self, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any],
                     model_sd: dict, optim_sd: dict, run_dir: Path) -> None:
        """Write ``run_dir/checkpoint.dcp``: every rank its shards (DCP), rank 0 the metadata. The
        new checkpoint is written to a temporary folder; only when every rank has finished does the
        current one become ``checkpoint.dcp.prev`` and the new one take its name."""
        import torch.distributed.checkpoint as dcp

        tmp = run_dir / _TMP_SHARDED_CHECKPOINT
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a run killed while saving left it
            tmp.mkdir(parents=True)
        self.barrier()
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
        if self.is_main:
            with open(tmp / _META, "wb") as fh:
                torch.save(meta, fh)
                fh.flush()
                os.fsync(fh.fileno())
        self.barrier()  # every rank's shards are on disk
        if self.is_main:
            cur, prev = run_dir / SHARDED_CHECKPOINT, run_dir / PREVIOUS_SHARDED_CHECKPOINT
            if cur.exists():
                shutil.rmtree(prev, ignore_errors=True)
                os.replace(cur, prev)
            os.replace(tmp, cur)
            from .train import _fsync_dir

            _fsync_dir(run_dir)
        self.barrier()

    def load_sharded(self, model: nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
        """Load a DCP checkpoint folder into the (possibly sharded) model and optimizer; it may have
        been written on another mesh or world size."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path), no_dist=not (self.active and dist.is_initialized()))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def barrier(self) -> None:
        if self.active and self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ faults
    def beat(self, step: int) -> None:
        """Tell the heartbeat which step this rank is at."""
        if self.heartbeat is not None:
            self.heartbeat.step = step

    def explain(self, exc: BaseException) -> Optional[str]:
        """For a failed collective, a message naming the rank(s) that stopped beating and the
        timeout; None when ``exc`` is not a failed collective."""
        if not self.active or self.world == 1 or not _is_collective_failure(exc):
            return None
        first = " ".join(str(exc).split())[:240]
        where = f"a collective failed on rank {self.rank} of {self.world}"
        if self.timeout_s is not None:
            where += f" (collective timeout {self.timeout_s:g} s, --dist-timeout)"
        after = max(2.5 * _HEARTBEAT_S, min(4.0, 0.8 * (self.timeout_s or 4.0)))
        silent = None
        if self.heartbeat is not None:  # a peer that just died may not look silent yet: ask until it would
            deadline = time.monotonic() + after
            while (silent := self.heartbeat.silent(after)) == [] and time.monotonic() < deadline:
                time.sleep(0.25)
        if silent is None:
            who = "the other ranks could not be asked which one stalled"
        elif silent:
            who = "; ".join(f"rank {r} never sent a heartbeat" if age == float("inf") else
                            f"rank {r} stopped responding (last heartbeat {age:.0f} s ago, at step {step})"
                            for r, age, step in silent)
        else:
            who = "every rank is still alive, so one took a different path or is much slower"
        return f"{who}: {where}: {first}"

    def close(self) -> None:
        """Stop the heartbeat; leave the process group if :func:`setup` created it."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def sharded_checkpoints(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The DCP checkpoint folders of ``run_dir`` whose metadata reads, newest first: (folder, meta)."""
    found = []
    for name in (SHARDED_CHECKPOINT, PREVIOUS_SHARDED_CHECKPOINT):
        path = run_dir / name
        if not (path / _META).is_file():
            continue
        try:
            meta = torch.load(path / _META, map_location="cpu", weights_only=True)
            int(meta["step"])
        except Exception:  # noqa: BLE001 - damaged: the caller warns and falls back
            continue
        found.append((path, meta))
    return found


def stale_sharded_temporary(run_dir: Path) -> Path:
    return run_dir / _TMP_SHARDED_CHECKPOINT


# ---------------------------------------------------------------------- sharding the lab GPT
def _fully_shard(model: nn.Module, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def tensor_parallel(model: nn.Module, mesh: Any) -> None:
    """Megatron-style tensor parallelism of the lab GPT over a 1-D mesh of T ranks: in each block
    wq, wk, wv and the MLP's w1, w3 are split by output rows (``ColwiseParallel``), wo and w2 by
    input columns (``RowwiseParallel``, whose output is summed over the T ranks). Each rank then
    computes H/T query heads and K/T key/value heads. Embeddings, head and norms stay whole."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    t = mesh.size()
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "blocks"):
        raise ValueError("tensor parallelism is written for the lab GPT (muonlab.lab.model.GPT)")
    if cfg.moe_experts:
        raise ValueError(f"--parallel tp does not split mixture-of-experts blocks (moe_experts={cfg.moe_experts}); "
                         "use --parallel fsdp or hsdp")
    for name in ("n_head", "n_kv_head", "d_ff"):
        if getattr(cfg, name) % t:
            raise ValueError(f"tensor parallelism over {t} ranks needs {name} divisible by {t}, "
                             f"got {name}={getattr(cfg, name)}")
    plan = {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(), "mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(),
            "mlp.w2": RowwiseParallel()}
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
        block.attn.n_head //= t
        block.attn.n_kv_head //= t
        block.attn.head_offset = mesh.get_local_rank() * block.attn.n_head  # QK-Clip: this rank's first global head


# ---------------------------------------------------------------------- the process group
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(mode: str, device: torch.device, mesh: Optional[str] = None,
          timeout_s: Optional[float] = None) -> Parallel:
    """Join (or create) the process group for ``mode``, build its mesh, pick this rank's device.

    ``timeout_s`` bounds every collective (a stalled or dead peer makes the others fail after it);
    default :data:`DEFAULT_TIMEOUT_S` when this call creates the group."""
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {list(MODES)}, got {mode!r}")
    if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {timeout_s!r}")
    if mode == "none":
        parse_mesh(mesh, mode, 1)
        return Parallel(device=device)
    owns = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # not under torchrun: a one-rank group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    elif timeout_s is not None:
        raise ValueError("--dist-timeout applies when muonlab creates the process group; this one already exists "
                         "(pass timeout= to your own init_process_group)")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        shape = parse_mesh(mesh, mode, world)
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        par = Parallel(mode=mode, rank=rank, world=world, device=device, mesh_shape=shape, owns_group=owns,
                       timeout_s=timeout_s)
        if mode != "ddp":
            from torch.distributed.device_mesh import init_device_mesh

            names = {"fsdp": ("dp",), "tp": ("tp",), "hsdp": ("replicate", "shard"), "fsdp+tp": ("dp", "tp")}[mode]
            par.mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
        if world > 1:
            par.heartbeat = Heartbeat.start(rank, world)
        return par
    except BaseException:
        if owns:
            dist.destroy_process_group()
        raise


# ---------------------------------------------------------------------- heartbeats
_COLLECTIVE_FAILURE = re.compile(r"timed out|timeout|gloo|nccl|connection (closed|reset)|broken pipe|"
                                 r"collective", re.IGNORECASE)


def _is_collective_failure(exc: BaseException) -> bool:
    from muonlab.distributed.common import CollectiveError

    if isinstance(exc, CollectiveError) or isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(exc)))


class Heartbeat:
    """Every second, this rank writes (wall time, step) under ``muonlab/heartbeat/<rank>`` in the
    rendezvous store, from a daemon thread with its own connection. A rank that is stopped (SIGSTOP),
    killed or wedged stops writing; :meth:`silent` lists those ranks. The store is torchrun's (or
    the one :func:`setup` created) at ``MASTER_ADDR:MASTER_PORT``."""

    def __init__(self, store: Any, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self.step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"muonlab-heartbeat-{rank}", daemon=True)
        self._lock = threading.Lock()

    @classmethod
    def start(cls, rank: int, world: int) -> Optional["Heartbeat"]:
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            return None
        try:
            store = dist.TCPStore(host, int(port), world, is_master=False,
                                  timeout=datetime.timedelta(seconds=30))
        except Exception:  # noqa: BLE001 - heartbeats only improve an error message
            return None
        hb = cls(store, rank, world)
        hb._write()
        hb._thread.start()
        return hb

    def _write(self) -> None:
        with self._lock:
            self.store.set(f"muonlab/heartbeat/{self.rank}", f"{time.time():.3f} {self.step}")

    def _run(self) -> None:
        while not self._stop.wait(_HEARTBEAT_S):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - the store went away (the job is ending)
                return

    def silent(self, after_s: float = 3 * _HEARTBEAT_S + 1.0) -> Optional[list[tuple[int, float, int]]]:
        """(rank, seconds since its last heartbeat, its step) of every other rank silent for longer
        than ``after_s``; None when the store cannot be read."""
        now, out = time.time(), []
        try:
            with self._lock:
                for r in range(self.world):
                    if r == self.rank:
                        continue
                    key = f"muonlab/heartbeat/{r}"
                    if not self.store.check([key]):
                        out.append((r, float("inf"), 0))
                        continue
                    t, step = self.store.get(key).decode().split()
                    if now - float(t) > after_s:
                        out.append((r, now - float(t), int(step)))
        except Exception:  # noqa: BLE001
            return None
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * _HEARTBEAT_S)
