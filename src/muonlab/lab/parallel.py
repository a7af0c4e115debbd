"""Data-parallel training for the lab trainer: ``--parallel none|ddp|fsdp`` under ``torchrun``.

``torchrun --nproc_per_node=2 -m muonlab train --parallel ddp ...`` starts one process per rank;
:func:`setup` joins the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; gloo on CPU, nccl on CUDA). :func:`Parallel.wrap`
wraps the model in DDP or shards it with FSDP2 ``fully_shard``; every rank takes its slice of each
global batch (global batch = ``batch_size``); only rank 0 writes metrics, checkpoints and results.
Checkpoints in parallel mode hold full (unsharded) state dicts keyed by parameter name, so a run
can resume at another world size. Without torchrun's variables a single-rank group is created on
a free localhost port, so ``--parallel ddp`` also runs as one plain process.

``muonlab.Muon`` picks up the process group by itself and spreads its orthogonalizations over the
ranks (see :mod:`muonlab.distributed`).
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

MODES = ("none", "ddp", "fsdp")


@dataclass
class Parallel:
    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    _scratch: Any = None

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ model and data
    def wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(the module to call, the module whose parameters the optimizer gets)."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DDP(model, device_ids=ids)
            return wrapped, model
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in getattr(model, "blocks", []):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model, model
        return model, model

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of a global batch."""
        if not self.active or self.world == 1:
            return x, y
        n = x.shape[0]
        if n % self.world:
            raise ValueError(f"batch size {n} is not divisible by the {self.world} ranks")
        k = n // self.world
        return x[self.rank * k:(self.rank + 1) * k], y[self.rank * k:(self.rank + 1) * k]

    def mean(self, value: float) -> float:
        """The mean of a float over ranks (the global batch's loss from per-rank losses)."""
        if not self.active or self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def out_dir(self, run_dir: Path) -> Path:
        """Where this rank writes metrics/results: the run folder on rank 0, a scratch folder elsewhere."""
        if self.is_main:
            return run_dir
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix=f"muonlab-rank{self.rank}-")
        return Path(self._scratch.name)

    # ------------------------------------------------------------------ checkpoints
    def state(self, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Full model and optimizer state dicts (collective: every rank calls it; rank 0 gets them)."""
        if not self.active:
            return model.state_dict(), opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, opt, options=opts)

    def load(self, model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
        """Load full state dicts (every rank has read the same checkpoint file)."""
        if not self.active:
            model.load_state_dict(model_sd)
            opt.load_state_dict(optim_sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))

    def barrier(self) -> None:
        if self.active and self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if :func:`setup` created it (the scratch folder lives on until exit)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(mode: str, device: torch.device) -> Parallel:
    """Join (or create) the process group for ``mode`` and pick this rank's device."""
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {list(MODES)}, got {mode!r}")
    if mode == "none":
        return Parallel(device=device)
    owns = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # not under torchrun: a one-rank group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return Parallel(mode=mode, rank=rank, world=world, device=device, owns_group=owns)
