"""Layer 3: distributed Muon on ``torch.distributed`` (DDP, replicated parameters, FSDP2 DTensors).

Under a process group, every logical matrix's orthogonalization is done by exactly one *owner*
rank; the owners are chosen by a deterministic greedy balance of estimated FLOPs (largest matrix
first, to the least-loaded rank), so all ranks compute the same assignment without talking. Each
rank orthogonalizes the matrices it owns (stacked by shape, like the single-process path), then one
``all_gather`` per dtype shares every result, so all ranks apply identical updates.

FSDP2 parameters (``DTensor`` with ``Shard``/``Replicate`` placements) are routed by their global
shape. Their momentum stays sharded like the parameter; the direction is gathered to its full
shape before orthogonalization, and each rank applies the slice of the update that matches its
local shard (uneven and empty shards included).

Participation is agreed with one small ``all_reduce`` per step (a parameter takes a Muon step only
if every rank has its gradient; gradient finiteness is agreed in the same call), so every rank
issues the same collectives in the same order and nothing hangs when a rank lacks a gradient.

The functions here are used by :class:`muonlab.Muon`; without an initialized process group the
optimizer never calls them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .orthogonalize import flops

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "assign_owners",
    "matrix_cost",
    "resolve_group",
    "is_dtensor",
    "local",
    "full_from_local",
    "local_slice",
    "agree",
    "orthogonalize_owned",
]


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


def full_from_local(local_part: Tensor, like: Tensor) -> Tensor:
    """The full (global) tensor whose local shard on this rank is ``local_part``, laid out like DTensor ``like``.

    A collective over ``like``'s device mesh: every rank of the mesh must call it.
    """
    dt = DTensor.from_local(local_part, like.device_mesh, like.placements, run_check=False,
                            shape=like.shape, stride=like.stride())
    return dt.full_tensor()


def local_slice(full: Tensor, like: Tensor) -> Tensor:
    """The part of the global tensor ``full`` that DTensor ``like`` holds on this rank (a view)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    out = full
    for dim, (size, start) in enumerate(zip(shape, offset)):
        if size != full.shape[dim]:
            out = out.narrow(dim, start, size)
    return out


def _comm_device(group: Any) -> torch.device:
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(flags: Sequence[bool], group: Any) -> list[bool]:
    """Logical AND of per-rank boolean flags across ``group`` (one all_reduce, also for an empty list)."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags] or [1.0], dtype=torch.float32, device=_comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return [bool(v) for v in t.tolist()[: len(flags)]]


# ---------------------------------------------------------------------- ownership
def matrix_cost(a: int, b: int, method: str = "newton_schulz", steps: int = 5) -> float:
    """Estimated FLOPs of one orthogonalization of an (a, b) matrix: the FLOP model of
    :func:`muonlab.orthogonalize.flops` (the Newton-Schulz count stands in for the other methods)."""
    return flops(method, a, b, steps)


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment: largest cost first to the least-loaded rank.

    Deterministic (ties broken by index, then by rank), so every rank computes the same list.
    """
    owners = [0] * len(costs)
    load = [0.0] * world_size
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owners[i] = r
        load[r] += costs[i]
    return owners


def orthogonalize_owned(
    items: Sequence[tuple[Tensor, Tensor, Any]],
    group: Any,
    run_bucket: Callable[[Any, list[tuple[Tensor, Tensor]]], None],
    times: Optional[dict[str, float]] = None,
    costs: Optional[Sequence[float]] = None,
) -> list[int]:
    """Orthogonalize logical matrices spread over ``group`` and share the results.

    ``items``: (src, dst, key) per logical matrix, in the same order on every rank; ``src`` is an
    (a, b) direction, ``dst`` the (a, b) view of the update to write, ``key`` the bucket key
    (shape, settings, device, dtype) that ``run_bucket(key, pairs)`` uses to orthogonalize a list
    of (src[None], dst[None]) pairs of the same key locally. Returns the owner of each item.

    ``times`` (optional) receives ``"orthogonalize_s"`` and ``"communicate_s"`` for this rank.
    ``costs`` (optional): the estimated FLOPs of each item, which the owners are balanced by
    (default: :func:`matrix_cost` of its shape).
    """
    import time

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if costs is None:
        costs = [matrix_cost(s.shape[-2], s.shape[-1]) for s, _, _ in items]
    owners = assign_owners(costs, world)
    # 1. the owned matrices, bucketed like the single-process path
    t0 = time.perf_counter()
    buckets: dict[Any, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    for (src, dst, key), owner in zip(items, owners):
        if owner == rank:
            buckets[key].append((src.unsqueeze(0), dst.unsqueeze(0)))
    for key, pairs in buckets.items():
        run_bucket(key, pairs)
    t1 = time.perf_counter()
    # 2. share: one all_gather per (device, dtype) of every rank's owned results, packed in item order
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, (_, dst, _) in enumerate(items):
        by_kind[(dst.device, dst.dtype)].append(i)
    for (device, dtype), idx in sorted(by_kind.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        sizes = [0] * world
        for i in idx:
            sizes[owners[i]] += items[i][1].numel()
        mine = [items[i][1].reshape(-1) for i in idx if owners[i] == rank]
        width = max(sizes)
        if width == 0 or world == 1:  # one rank: every result is already in place
            continue
        send = torch.zeros(width, dtype=dtype, device=device)
        if mine:
            packed = torch.cat(mine)
            send[: packed.numel()] = packed
        recv = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(recv, send, group=group)
        offsets = [0] * world
        for i in idx:
            r = owners[i]
            dst = items[i][1]
            n = dst.numel()
            if r != rank:
                dst.copy_(recv[r][offsets[r]: offsets[r] + n].view(dst.shape))
            offsets[r] += n
    if times is not None:
        times["orthogonalize_s"] = times.get("orthogonalize_s", 0.0) + (t1 - t0)
        times["communicate_s"] = times.get("communicate_s", 0.0) + (time.perf_counter() - t1)
    return owners
