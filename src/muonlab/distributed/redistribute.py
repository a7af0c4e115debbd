"""Layer 3 (sharded engine): execute a :class:`~.plan.ShardPlan` for one step.

Per round, at most two ``all_to_all_single`` calls per dtype:

1. **to owners**: every source rank packs its pieces of the round's matrices, destination by
   destination; each owner unpacks them into the matrix's buffer (a matrix the owner holds whole
   is read in place, with no copy and no traffic);
2. the owners run ``compute`` on their matrices (stacked by shape: the optimizer's orthogonalization,
   NorMuon and shape scale);
3. **back to holders**: each owner packs, for every rank holding a piece of a matrix it owns, the
   update of exactly that piece; each rank writes what it receives into its local update.

No rank materializes a matrix it does not own, and the buffers of one round are bounded by the
plan's byte budget. A round with no traffic across ranks issues no collective (every rank knows
this from the plan, so they skip it together).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .common import collective
from .plan import MatrixPlan, Piece, Sel, ShardPlan

Job = tuple[MatrixPlan, Tensor, Tensor]  # (matrix, source (a, b), destination (a, b) to write)


def _index(sel: tuple[Sel, ...], device: torch.device) -> tuple:
    if all(isinstance(s, slice) for s in sel):
        return sel
    nd = len(sel)
    out = []
    for d, s in enumerate(sel):
        t = torch.arange(s.start, s.stop) if isinstance(s, slice) else torch.tensor(s, dtype=torch.long)
        out.append(t.to(device).view([-1 if i == d else 1 for i in range(nd)]))
    return tuple(out)


def take(t: Tensor, sel: tuple[Sel, ...]) -> Tensor:
    """``t`` restricted to ``sel`` (a view when every selection is a slice)."""
    return t[_index(sel, t.device)]


def put(t: Tensor, sel: tuple[Sel, ...], values: Tensor) -> None:
    """Write ``values`` into ``t`` at ``sel``."""
    idx = _index(sel, t.device)
    if all(isinstance(s, slice) for s in sel):
        t[idx].copy_(values)
    else:
        t[idx] = values


def _all_to_all(out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], group: Any, what: str) -> None:
    collective(f"all_to_all ({what})",
               lambda: dist.all_to_all_single(out, inp, out_splits, in_splits, group=group), group)


def redistribute(
    plan: ShardPlan,
    dirs: Sequence[Tensor],
    upds: Sequence[Tensor],
    compute: Callable[[list[Job]], None],
    group: Any,
    dtypes: Sequence[tuple[torch.dtype, torch.dtype]],
    times: Optional[dict[str, float]] = None,
) -> None:
    """Run ``plan``: ``dirs[i]``/``upds[i]`` are this rank's local direction and update tensors of
    entry i (the update is written); ``dtypes[i]`` their dtypes (the same on every rank);
    ``compute(jobs)`` fills each job's destination from its source, on the owner."""
    me = dist.get_rank(group)
    world = plan.world
    t_comm = t_comp = 0.0
    rounds: list[list[MatrixPlan]] = [[] for _ in range(plan.rounds)]
    for m in plan.matrices:
        rounds[m.round].append(m)
    device = next((d.device for d in dirs), torch.device("cpu"))
    for rnd, mats in enumerate(rounds):
        t0 = time.perf_counter()
        # ---- 1. pieces to their owners
        got = _exchange(mats, me, world, group, device, f"round {rnd}: pieces to owners", forward=True,
                        payload=lambda m, p: take(dirs[m.entry], p.local), dtype=lambda m: dtypes[m.entry][0])
        t1 = time.perf_counter()
        # ---- 2. the owners assemble and compute
        jobs: list[Job] = []
        results: list[tuple[MatrixPlan, Tensor]] = []
        for m in mats:
            if m.owner != me:
                continue
            mine = m.piece_of(me)
            din, dout = dtypes[m.entry]
            if mine is not None and mine.numel == m.numel:
                src_box = take(dirs[m.entry], mine.local)
            else:
                src_box = torch.empty(m.box.size, dtype=din, device=device)
                for p in m.sources:
                    vals = take(dirs[m.entry], p.local) if p.rank == me else got.pop((id(m), p.rank))[2]
                    put(src_box, p.box, vals.reshape(p.shape))
            res_box = torch.empty(m.box.size, dtype=dout, device=device)
            src2d, dst2d = src_box.reshape(m.box.shape2d), res_box.view(m.box.shape2d)
            if m.box.transposed:
                src2d, dst2d = src2d.mT, dst2d.mT
            jobs.append((m, src2d, dst2d))
            results.append((m, res_box))
        if jobs:
            compute(jobs)
        del jobs
        t2 = time.perf_counter()
        res_of = {id(m): r for m, r in results}
        # ---- 3. update pieces back to every holder
        for m, res_box in results:
            p = m.piece_of(me)
            if p is not None:
                put(upds[m.entry], p.local, take(res_box, p.box).reshape(p.shape))
        back = _exchange(mats, me, world, group, device, f"round {rnd}: updates to holders", forward=False,
                         payload=lambda m, p: take(res_of[id(m)], p.box), dtype=lambda m: dtypes[m.entry][1])
        del results, res_of, got
        for m, p, vals in back.values():
            put(upds[m.entry], p.local, vals.reshape(p.shape))
        t_comm += (t1 - t0) + (time.perf_counter() - t2)
        t_comp += t2 - t1
    if times is not None:
        times["orthogonalize_s"] = times.get("orthogonalize_s", 0.0) + t_comp
        times["communicate_s"] = times.get("communicate_s", 0.0) + t_comm


def _exchange(mats: list[MatrixPlan], me: int, world: int, group: Any, device: torch.device, what: str,
              forward: bool, payload: Callable[[MatrixPlan, Piece], Tensor],
              dtype: Callable[[MatrixPlan], torch.dtype]) -> dict[tuple[int, int], tuple[MatrixPlan, Piece, Tensor]]:
    """One all_to_all per dtype that any rank sends in this round: pieces go from their source to the
    owner (``forward``) or from the owner back to every holder. Returns what this rank received,
    keyed by (id(matrix), peer rank)."""
    sends: dict[torch.dtype, list[list[Tensor]]] = {}
    recvs: dict[torch.dtype, list[list[tuple[MatrixPlan, Piece]]]] = {}
    for m in mats:
        transfers = ([(p.rank, m.owner, p) for p in m.sources] if forward
                     else [(m.owner, p.rank, p) for p in m.pieces])
        for src, dst, p in transfers:
            if src == dst:
                continue
            dt = dtype(m)
            sends.setdefault(dt, [[] for _ in range(world)])
            recvs.setdefault(dt, [[] for _ in range(world)])
            if src == me:
                sends[dt][dst].append(payload(m, p).reshape(-1))
            if dst == me:
                recvs[dt][src].append((m, p))
    out: dict[tuple[int, int], tuple[MatrixPlan, Piece, Tensor]] = {}
    for dt in sorted(sends, key=str):  # the same dtypes, in the same order, on every rank
        in_splits = [sum(t.numel() for t in ts) for ts in sends[dt]]
        out_splits = [sum(p.numel for _, p in ps) for ps in recvs[dt]]
        flat = [t for ts in sends[dt] for t in ts]
        inp = torch.cat(flat) if flat else torch.empty(0, dtype=dt, device=device)
        del flat
        buf = torch.empty(sum(out_splits), dtype=dt, device=device)
        _all_to_all(buf, inp, out_splits, in_splits, group, what)
        del inp
        offset = 0
        for src, ps in enumerate(recvs[dt]):
            for m, p in ps:
                out[(id(m), src)] = (m, p, buf[offset:offset + p.numel])
                offset += p.numel
    return out
