"""Layer 3 (sharded engine): the plan of a distributed Muon step.

For every logical Muon matrix (a whole matrix, a head, an expert, a split part: see
:func:`muonlab.views.matrix_boxes`) the plan records

* its **pieces**: the part each rank holds (from the parameter's :class:`~.layout.Layout`), as a
  selection in that rank's local tensor and in the matrix's own buffer;
* its **owner**: the one rank that orthogonalizes it. Owners are balanced by the FLOP model of the
  method that runs (greedy, largest first, to the least-loaded candidate); the candidates are the
  ranks that hold the *whole* matrix when there are any (an expert or a head that lives on one rank
  is computed there, with no communication), else every rank that holds a piece;
* its **sources**: one holder per distinct piece (replicas, e.g. HSDP's, send it once; the owner
  uses its own copy when it has one);
* its **round**: matrices are processed in rounds whose per-rank bytes stay under a budget, so
  the buffers of a step are bounded whatever the model size.

Every rank builds the same plan from the same inputs without talking; :mod:`.redistribute`
executes it with two ``all_to_all`` calls per round (pieces to owners, update pieces back).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from ..views import Box, matrix_boxes
from .layout import Index, Layout

Sel = Union[slice, tuple[int, ...]]  # a selection along one dimension


@dataclass
class Piece:
    """The part of one logical matrix held by one rank."""

    rank: int
    local: tuple[Sel, ...]  # where it is in the rank's local tensor
    box: tuple[Sel, ...]    # where it goes in the matrix's box buffer
    shape: tuple[int, ...]
    numel: int


@dataclass
class MatrixPlan:
    entry: int     # which parameter (index into the plan's entries)
    index: int     # which logical matrix of that parameter
    box: Box
    cost: float
    owner: int = -1
    pieces: list[Piece] = field(default_factory=list)   # every holder's piece, group-rank order
    sources: list[Piece] = field(default_factory=list)  # one per distinct piece
    round: int = 0

    @property
    def numel(self) -> int:
        return self.box.shape2d[0] * self.box.shape2d[1]

    def piece_of(self, rank: int) -> Optional[Piece]:
        for p in self.pieces:
            if p.rank == rank:
                return p
        return None


@dataclass
class ShardPlan:
    """Who owns which logical matrix, which pieces travel where, and in which round."""

    world: int
    matrices: list[MatrixPlan]
    rounds: int
    sent_bytes: list[int]       # per rank, per step: pieces to owners + update pieces back
    received_bytes: list[int]
    owned_flops: list[float]    # per rank: the estimated orthogonalization FLOPs it owns

    def summary(self) -> str:
        """One line per rank: owned matrices, FLOPs, bytes sent and received per step."""
        lines = [f"sharded Muon plan: {len(self.matrices)} logical matrices over {self.world} ranks in {self.rounds} round(s)"]
        for r in range(self.world):
            n = sum(1 for m in self.matrices if m.owner == r)
            lines.append(f"  rank {r}: owns {n} matrices ({self.owned_flops[r] / 1e9:.3g} GFLOP), "
                         f"sends {self.sent_bytes[r] / 2**20:.2f} MiB, receives {self.received_bytes[r] / 2**20:.2f} MiB")
        return "\n".join(lines)


def _intersect(idx: Index, start: int, size: int) -> Optional[tuple[Sel, Sel, int]]:
    """(local selection, box selection, length) of the indices of ``idx`` inside [start, start + size)."""
    stop = start + size
    if isinstance(idx, range):
        lo, hi = max(idx.start, start), min(idx.stop, stop)
        if hi <= lo:
            return None
        return slice(lo - idx.start, hi - idx.start), slice(lo - start, hi - start), hi - lo
    ks = [k for k, g in enumerate(idx) if start <= g < stop]
    if not ks:
        return None
    return _compact(ks), _compact([idx[k] - start for k in ks]), len(ks)


def _compact(positions: Sequence[int]) -> Sel:
    if list(positions) == list(range(positions[0], positions[0] + len(positions))):
        return slice(positions[0], positions[0] + len(positions))
    return tuple(positions)


def _tiles(sigs: list[tuple], size: tuple[int, ...]) -> bool:
    """True if the distinct pieces (box signatures) form a grid that covers the box exactly once:
    along every dimension their selections partition [0, size), and every combination occurs once
    (DTensor shards are always such a grid)."""
    per_dim: list[set] = [set() for _ in size]
    for sig in sigs:
        for d, sel in enumerate(sig):
            per_dim[d].add(sel)
    for d, sels in enumerate(per_dim):
        seen = [0] * size[d]
        for sel in sels:
            for i in _positions(sel):
                seen[i] += 1
        if any(c != 1 for c in seen):
            return False
    return len(set(sigs)) == len(sigs) == math.prod(len(s) for s in per_dim)


def _positions(sig_sel: tuple) -> Sequence[int]:
    """The box positions a selection's signature stands for."""
    return range(sig_sel[1][0], sig_sel[1][1]) if sig_sel[0] == "slice" else sig_sel[1]


def _sig(sel: tuple[Sel, ...]) -> tuple:
    return tuple(("slice", (s.start, s.stop)) if isinstance(s, slice) else ("list", s) for s in sel)


def assign_owners(costs: Sequence[float], world_size: int,
                  candidates: Optional[Sequence[Sequence[int]]] = None) -> list[int]:
    """Greedy longest-processing-time assignment: largest cost first, to the least-loaded rank
    among its ``candidates`` (default: every rank). Deterministic (ties by index, then by rank),
    so every rank computes the same list."""
    owners = [0] * len(costs)
    load = [0.0] * world_size
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        cand = candidates[i] if candidates is not None else range(world_size)
        r = min(cand, key=lambda k: (load[k], k))
        owners[i] = r
        load[r] += costs[i]
    return owners


def build_plan(entries: Sequence[tuple[Layout, str, Any]], world: int, cost_fn: Any,
               elem_bytes: Sequence[tuple[int, int]], round_bytes: int, names: Sequence[str] = ()) -> ShardPlan:
    """The plan for ``entries``: (layout, view, key) per Muon parameter, in the same order on every rank.

    ``cost_fn(logical_shape, key)`` estimates one orthogonalization's FLOPs; ``elem_bytes[i]`` is
    (direction, update) bytes per element of entry i; ``round_bytes`` bounds the bytes a rank
    owns, sends or receives in one round (a matrix larger than that is a round of its own).
    """
    matrices: list[MatrixPlan] = []
    candidates: list[list[int]] = []
    replicas: list[list[list[Piece]]] = []  # per matrix: the holders of each distinct piece
    for ei, (layout, view, key) in enumerate(entries):
        name = names[ei] if ei < len(names) else f"parameter {ei}"
        for mi, box in enumerate(matrix_boxes(layout.shape, view)):
            m = MatrixPlan(ei, mi, box, float(cost_fn(box.logical_shape, key)))
            total = box.shape2d[0] * box.shape2d[1]
            distinct: dict[tuple, list[Piece]] = defaultdict(list)
            for rank, idx in layout.holders:
                parts = [_intersect(i, s, n) for i, s, n in zip(idx, box.start, box.size)]
                if any(p is None for p in parts):
                    continue
                piece = Piece(rank, tuple(p[0] for p in parts), tuple(p[1] for p in parts),
                              tuple(p[2] for p in parts), int(torch.Size([p[2] for p in parts]).numel()))
                m.pieces.append(piece)
                distinct[_sig(piece.box)].append(piece)
            if not _tiles(list(distinct), box.size):
                raise RuntimeError(f"{name}: the shards of logical matrix {mi} ({box.logical_shape}) do not tile it "
                                   "exactly; this layout is not supported by the sharded Muon engine")
            whole = [p.rank for p in m.pieces if p.numel == total]
            candidates.append(whole or [p.rank for p in m.pieces])
            replicas.append(list(distinct.values()))
            matrices.append(m)
    owners = assign_owners([m.cost for m in matrices], world, candidates)
    for i, (m, owner, groups) in enumerate(zip(matrices, owners, replicas)):
        m.owner = owner
        sources = []
        for group in groups:  # the owner's own copy, else one holder, spread by the matrix index
            mine = [p for p in group if p.rank == owner]
            sources.append(mine[0] if mine else group[i % len(group)])
        m.sources = sorted(sources, key=lambda p: p.rank)
    # rounds: walk the matrices in order; cut before a matrix that would push a rank over the budget
    sent, recv, owned = [0] * world, [0] * world, [0.0] * world
    load = [0] * world
    rnd = 0
    for m in matrices:
        din, dout = elem_bytes[m.entry]
        add = [0] * world
        add[m.owner] += m.numel * (din + dout)
        for p in m.sources:
            if p.rank != m.owner:
                add[p.rank] += p.numel * din
        for p in m.pieces:
            if p.rank != m.owner:
                add[p.rank] += p.numel * dout
        if any(load) and any(l + a > round_bytes for l, a in zip(load, add)):
            rnd += 1
            load = [0] * world
        load = [l + a for l, a in zip(load, add)]
        m.round = rnd
        owned[m.owner] += m.cost
        for p in m.sources:
            if p.rank != m.owner:
                sent[p.rank] += p.numel * din
                recv[m.owner] += p.numel * din
        for p in m.pieces:
            if p.rank != m.owner:
                sent[m.owner] += p.numel * dout
                recv[p.rank] += p.numel * dout
    return ShardPlan(world, matrices, rnd + 1 if matrices else 0, sent, recv, owned)
