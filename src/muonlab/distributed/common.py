"""Layer 3: small helpers of distributed Muon: the process group, DTensor access, agreement, costs."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..orthogonalize import flops

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["CollectiveError", "collective", "matrix_cost", "resolve_group", "is_dtensor", "local", "agree", "comm_device"]


# ---------------------------------------------------------------------- groups and DTensors
def resolve_group(process_group: Any) -> Optional[Any]:
    """The process group Muon distributes over, or None for single-process behaviour.

    ``process_group=None`` (the default) means the world group when ``torch.distributed`` is
    initialized; ``False`` forces single-process behaviour (only valid without DTensor params).
    """
    if process_group is False:
        return None
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (aliases its storage: in-place writes reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def comm_device(group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class CollectiveError(RuntimeError):
    """A collective of the Muon step failed or timed out: a peer rank stalled, died or diverged."""


def collective(what: str, fn: Callable[[], Any], group: Any) -> Any:
    """Run one collective; on failure raise :class:`CollectiveError` naming this rank, the
    collective and the group's timeout (gloo and NCCL wait at most that long for a stalled peer)."""
    try:
        return fn()
    except Exception as e:  # gloo/NCCL raise RuntimeError or DistBackendError subclasses
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        timeout = _group_timeout(group)
        raise CollectiveError(
            f"Muon step: {what} failed on rank {rank} of {world}"
            f"{f' after the process group timeout of {timeout:g} s' if timeout else ''}: {str(e).splitlines()[0][:300]}."
            f" A peer rank stalled, died or took a different path; set the timeout with "
            "init_process_group(timeout=...) (the lab: --dist-timeout)") from e


def _group_timeout(group: Any) -> Optional[float]:
    """The group's collective timeout in seconds, where this torch exposes it (informative only)."""
    try:
        pg = dist.group.WORLD if group is None else group
        backend = pg._get_backend(comm_device(pg))
        return float(backend.options._timeout.total_seconds())
    except Exception:  # noqa: BLE001
        return None


def agree(flags: Sequence[bool], group: Any) -> list[bool]:
    """Logical AND of per-rank boolean flags across ``group`` (one all_reduce, also for an empty list)."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags] or [1.0], dtype=torch.float32, device=comm_device(group))
    collective("the agreement all_reduce (gradients present and finite)",
               lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group), group)
    return [bool(v) for v in t.tolist()[: len(flags)]]


# ---------------------------------------------------------------------- ownership
def matrix_cost(a: int, b: int, method: str = "newton_schulz", steps: int = 5) -> float:
    """Estimated FLOPs of one orthogonalization of an (a, b) matrix: the FLOP model of
    :func:`muonlab.orthogonalize.flops` (the Newton-Schulz count stands in for the other methods)."""
    return flops(method, a, b, steps)
