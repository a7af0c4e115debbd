"""Layer 3 (sharded engine): which elements of a parameter each rank holds.

A parameter's *layout* lists, for every rank of the process group that holds part of it, the
global indices it holds along each dimension (its local tensor is the outer product of these index
lists, in that order). A plain tensor (DDP, replicated) is held whole by every rank; a ``DTensor``'s
layout follows its mesh and placements: ``Shard(d)`` splits dimension d like ``torch.chunk``
(uneven and empty shards included), ``_StridedShard`` (FSDP2 over tensor parallel on the same
dimension) first splits into ``split_factor`` parts and takes this rank's chunk of each, and
``Replicate`` copies. The layout is computed for every rank without communication and checked
against the local shard this rank really holds, so a layout we read wrongly raises instead of
corrupting the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .common import comm_device, is_dtensor

Index = Union[range, tuple[int, ...]]  # a range when contiguous, else the sorted global indices


@dataclass(frozen=True)
class Layout:
    """``shape``: the global shape; ``holders``: (group rank, per-dimension global indices) of every
    rank holding a non-empty part, in group-rank order."""

    shape: tuple[int, ...]
    holders: tuple[tuple[int, tuple[Index, ...]], ...]


def _chunk(idx: Index, n: int, c: int) -> Index:
    """Part ``c`` of ``idx`` split in ``n`` like ``torch.chunk`` (chunks of ceil(L/n); late ones may be empty)."""
    size = math.ceil(len(idx) / n) if len(idx) else 0
    lo = min(c * size, len(idx))
    return idx[lo:min(lo + size, len(idx))]


def _concat(parts: Sequence[Index]) -> Index:
    flat = tuple(i for p in parts for i in p)
    if flat and flat == tuple(range(flat[0], flat[0] + len(flat))):
        return range(flat[0], flat[0] + len(flat))
    return flat if flat else range(0)


def shard_indices(shape: Sequence[int], mesh_shape: Sequence[int], coord: Sequence[int],
                  placements: Sequence[Any]) -> tuple[Index, ...]:
    """Global indices along each dimension of the shard at mesh coordinate ``coord``.

    Placements apply left to right over the mesh dimensions, as DTensor defines them.
    """
    idx: list[Index] = [range(int(s)) for s in shape]
    for mesh_dim, pl in enumerate(placements):
        strided = type(pl).__name__ == "_StridedShard"
        if not strided and not pl.is_shard():
            continue  # Replicate (and Partial, refused by the caller) keep every index
        d, n, c = pl.dim, int(mesh_shape[mesh_dim]), int(coord[mesh_dim])
        if strided:  # split in split_factor parts first, then take chunk c of each (torch's definition)
            sf = int(pl.split_factor)
            idx[d] = _concat([_chunk(_chunk(idx[d], sf, k), n, c) for k in range(sf)])
        else:
            idx[d] = _chunk(idx[d], n, c)
    return tuple(idx)


def layout_of(p: Tensor, group: Any, name: str = "parameter") -> Layout:
    """The :class:`Layout` of parameter ``p`` over process group ``group``."""
    world = dist.get_world_size(group)
    shape = tuple(int(s) for s in p.shape)
    if not is_dtensor(p):
        full = tuple(range(s) for s in shape)
        return Layout(shape, tuple((r, full) for r in range(world)))
    mesh, placements = p.device_mesh, p.placements
    if any(pl.is_partial() for pl in placements):
        raise ValueError(f"{name} with shape {shape} has a Partial placement {placements}; "
                         "Muon needs reduced gradients and parameters (Shard or Replicate)")
    group_ranks = dist.get_process_group_ranks(group)
    mesh_ranks = mesh.mesh.reshape(-1).tolist()
    mesh_shape = tuple(mesh.mesh.shape)
    # a parameter on a sub-mesh (e.g. FSDP's dp mesh inside a dp x tp mesh, for a parameter that
    # tensor parallelism left alone) has a copy on each sibling sub-mesh: read it over the root mesh,
    # Replicate along the other dimensions (checked by implicit_replicas() when the plan is built)
    root, sub_dims = mesh, list(range(len(mesh_shape)))
    if sorted(mesh_ranks) != sorted(group_ranks):
        root = _root_mesh(mesh)
        names, root_names = mesh.mesh_dim_names, getattr(root, "mesh_dim_names", None)
        if (root is mesh or not names or not root_names or not set(names) <= set(root_names)
                or sorted(root.mesh.reshape(-1).tolist()) != sorted(group_ranks)):
            raise ValueError(
                f"{name} with shape {shape} lives on a device mesh of ranks {sorted(mesh_ranks)}, but Muon's "
                f"process_group has ranks {sorted(group_ranks)}; every rank of the group must compute the same "
                "plan, so pass Muon(..., process_group=<the group of the parameters' mesh>)")
        sub_dims = [root_names.index(n) for n in names]
    root_shape = tuple(root.mesh.shape)
    holders = []
    me = dist.get_rank()
    mine = None
    for flat, global_rank in enumerate(root.mesh.reshape(-1).tolist()):
        coord, rem = [], flat
        for s in reversed(root_shape):
            coord.append(rem % s)
            rem //= s
        coord.reverse()
        idx = shard_indices(shape, mesh_shape, [coord[d] for d in sub_dims], placements)
        if global_rank == me:
            mine = idx
        if all(len(i) for i in idx):
            holders.append((dist.get_group_rank(group, global_rank), idx))
    local_shape = tuple(p.to_local().shape)
    if mine is not None and tuple(len(i) for i in mine) != local_shape:
        raise RuntimeError(
            f"{name} with shape {shape}: placements {placements} on mesh {mesh_shape} give this rank a "
            f"shard of shape {tuple(len(i) for i in mine)}, but its local tensor is {local_shape}; "
            "this layout is not supported by the sharded Muon engine")
    holders.sort(key=lambda h: h[0])
    return Layout(shape, tuple(holders))


def _root_mesh(mesh: Any) -> Any:
    get = getattr(mesh, "_get_root_mesh", None)
    if get is not None:
        return get()
    from torch.distributed.device_mesh import _mesh_resources  # older torch

    return _mesh_resources.get_root_mesh(mesh)


def is_submesh(p: Tensor, group: Any) -> bool:
    """True if DTensor ``p`` lives on a sub-mesh that covers only part of ``group`` (its copies on the
    sibling sub-meshes are treated as replicas)."""
    return is_dtensor(p) and sorted(p.device_mesh.mesh.reshape(-1).tolist()) != sorted(dist.get_process_group_ranks(group))


def check_replicas(params: list[tuple[str, Tensor, Layout]], group: Any) -> None:
    """Raise if the copies of a sub-mesh parameter on sibling sub-meshes differ (they are read as
    replicas; were they not, the step would mix unrelated tensors). One all_gather of two float64
    checksums per parameter."""
    if not params:
        return
    sums = torch.tensor([[float(t.to_local().double().sum()), float(t.to_local().double().square().sum())]
                         for _, t, _ in params], dtype=torch.float64)
    dev = comm_device(group)
    world = dist.get_world_size(group)
    out = [torch.empty_like(sums, device=dev) for _ in range(world)]
    dist.all_gather(out, sums.to(dev), group=group)
    table = torch.stack(out).cpu()  # (world, params, 2)
    for k, (name, t, layout) in enumerate(params):
        seen: dict[tuple, int] = {}
        for rank, idx in layout.holders:
            sig = tuple((i.start, i.stop) if isinstance(i, range) else i for i in idx)
            first = seen.setdefault(sig, rank)
            if not torch.allclose(table[rank, k], table[first, k], rtol=1e-6, atol=0.0):
                raise RuntimeError(
                    f"{name} with shape {tuple(t.shape)} lives on a sub-mesh, and its copies on ranks {first} and "
                    f"{rank} differ (checksums {table[first, k].tolist()} vs {table[rank, k].tolist()}); Muon reads "
                    "them as replicas. Put the parameter on the full mesh or pass the sub-mesh's process_group.")
