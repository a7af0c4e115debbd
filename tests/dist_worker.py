"""Worker process for tests/test_distributed.py (not a test module itself).

Usage: python tests/dist_worker.py SCENARIOS RANK WORLD PORT OUTDIR [CKPT_DIR]

SCENARIOS is a comma-separated list of: replicated, ddp, fsdp, fsdp_clip, nograd, nonfinite, ckpt_save, ckpt_load.
Each scenario trains the tiny ``Net`` below with ``muonlab.Muon`` on the same global batches as
the single-process reference (each rank takes its slice of every batch) and saves the full
parameters to OUTDIR/<scenario>_rank<RANK>.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from muonlab import Muon

VOCAB, DIM, BATCH, SEQ = 16, 8, 12, 5  # BATCH divides over 1, 2, 3 and 4 ranks
STEPS = 4
CLIP = {"clip_momentum_norm": 0.05, "momentum_form": "sum"}


class Net(nn.Module):
    """Muon matrices of awkward shapes: (12, 8), (3, 12) (uneven over 2 ranks), (1, 3) (an empty
    shard over 2 ranks), a heads:2 view (6, 8) and an expert stack (2, 4, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.a = nn.Linear(DIM, 12)
        self.b = nn.Linear(12, 3, bias=False)
        self.c = nn.Linear(3, 1, bias=False)
        self.w6 = nn.Parameter(torch.randn(6, DIM) / DIM**0.5)
        self.experts = nn.Parameter(torch.randn(2, 4, DIM) / DIM**0.5)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, x: torch.Tensor, use_w6: bool = True) -> torch.Tensor:
        h = self.emb(x)
        h = h + 0.5 * self.c(torch.tanh(self.b(torch.tanh(self.a(h)))))
        if use_w6:
            h = h + torch.tanh(h @ self.w6.T) @ self.w6
        h = h + torch.tanh(h @ self.experts[0].T) @ self.experts[1]
        return self.head(h)


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


MUON = ["a.weight", "b.weight", "c.weight", "w6", "experts"]
VIEWS = {"w6": "heads:2", "experts": "experts"}
RMS = ["a.bias"]  # with rms=True: seed 002's RMS-normalized momentum instead of AdamW


def param_groups(model: nn.Module, rms: bool = False, named: dict | None = None) -> list[dict]:
    named = named if named is not None else dict(model.named_parameters())
    rest = [n for n in named if n not in MUON and not (rms and n in RMS)]
    groups = [
        {"params": [(n, named[n]) for n in MUON], "algorithm": "muon",
         "views": [VIEWS.get(n, "matrix") for n in MUON]},
        {"params": [(n, named[n]) for n in rest], "algorithm": "adamw"},
    ]
    if rms:
        groups.append({"params": [(n, named[n]) for n in RMS], "algorithm": "rms", "lr": 0.01})
    return groups


def make_optimizer(model: nn.Module, rms: bool = False, named: dict | None = None, **kw) -> Muon:
    return Muon(param_groups(model, rms, named), lr=0.05, adamw_lr=1e-2, weight_decay=0.01, **kw)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return x, y


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, use_w6: bool = True) -> torch.Tensor:
    return F.cross_entropy(model(x, use_w6).reshape(-1, VOCAB), y.reshape(-1))


def reference(steps: int = STEPS, nograd: bool = False, start: int = 0, model=None, opt=None, rms: bool = False,
              **kw) -> dict:
    """The single-process run on the full global batches."""
    model = model or make_model()
    opt = opt or make_optimizer(model, rms=rms, process_group=False, **kw)
    for step in range(start, start + steps):
        x, y = batch(step)
        loss_fn(model, x, y, use_w6=not nograd).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def full_params(model: nn.Module) -> dict:
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n.replace("module.", "")] = t.detach().clone()
    return out


def my_slice(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    k = t.shape[0] // world
    return t[rank * k:(rank + 1) * k]


def train_steps(model, opt, rank, world, start, steps, *, allreduce=False, nograd=False):
    for step in range(start, start + steps):
        x, y = batch(step)
        x, y = my_slice(x, rank, world), my_slice(y, rank, world)
        skip_w6 = nograd and rank == world - 1
        loss_fn(model, x, y, use_w6=not skip_w6).backward()
        if allreduce:
            for n, p in model.named_parameters():
                if nograd and n == "w6":
                    continue  # some rank has no gradient: the user cannot all-reduce it
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()


def fsdp_model(world: int, hsdp: bool = False) -> nn.Module:
    """FSDP2 on a 1-D mesh, or (``hsdp``) on a (2, world / 2) mesh: HSDP's (Replicate, Shard(0))."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = (init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if hsdp
            else init_device_mesh("cpu", (world,)))
    fully_shard(model, mesh=mesh)
    return model


# ---------------------------------------------------------------------- layouts (sharded engine)
# Each layout maps a parameter name to (mesh shape, placements) or None (a plain replicated tensor).
# Parameters become DTensors with those placements; every rank computes the full-batch gradient on
# the gathered parameters and takes its shard of it, so the optimizer alone is under test.
def _layouts(world: int) -> dict:
    from torch.distributed.tensor import Replicate, Shard

    one = (world,)
    two = (2, world // 2) if world % 2 == 0 else (1, world)
    return {
        "rows": lambda n, p: (one, [Shard(0)]) if n in MUON else None,                # TP colwise / FSDP
        "cols": lambda n, p: (one, [Shard(1)]) if n in MUON and n != "experts" else
                             ((one, [Shard(2)]) if n == "experts" else None),            # TP rowwise
        "ep": lambda n, p: (one, [Shard(0)]) if n == "experts" else None,              # expert parallel
        "hsdp": lambda n, p: (two, [Replicate(), Shard(0)]),                           # every parameter
        "fsdp_tp": lambda n, p: (two, [Shard(0), Shard(1)]) if p.ndim == 2 else (two, [Replicate(), Replicate()]),
        "mixed": lambda n, p: (one, [Shard(1)]) if n in ("a.weight", "w6") else ((one, [Shard(0)]) if p.ndim >= 2 else None),
    }


def layout_run(layout: str, rank: int, world: int, *, rms: bool = False, steps: int = STEPS, **kw) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    spec = _layouts(world)[layout]
    plain = make_model()  # holds the full parameters for the forward/backward
    meshes: dict = {}
    named, where = {}, {}
    for n, p in plain.named_parameters():
        lay = spec(n, p)
        if lay is None:
            named[n] = nn.Parameter(p.detach().clone())
        else:
            shape, placements = lay
            if shape not in meshes:
                meshes[shape] = init_device_mesh("cpu", shape)
            named[n] = nn.Parameter(distribute_tensor(p.detach().clone(), meshes[shape], placements))
        where[n] = lay
    opt = make_optimizer(plain, rms=rms, named=named, **kw)
    for step in range(steps):
        with torch.no_grad():
            for n, p in plain.named_parameters():
                q = named[n]
                p.copy_(q.full_tensor() if hasattr(q, "full_tensor") else q)
        plain.zero_grad()
        x, y = batch(step)
        loss_fn(plain, x, y).backward()
        for n, p in plain.named_parameters():
            g = p.grad.detach().clone()
            q = named[n]
            q.grad = distribute_tensor(g, q.device_mesh, q.placements) if hasattr(q, "device_mesh") else g
        opt.step()
        opt.zero_grad()
    out = {n: (q.full_tensor() if hasattr(q, "full_tensor") else q).detach().clone() for n, q in named.items()}
    plan = opt.last_shard_plan
    out["__plan__"] = {
        "sent": plan.sent_bytes, "received": plan.received_bytes, "rounds": plan.rounds,
        "owners": [(MUON[m.entry], m.index, m.owner, sorted(p.rank for p in m.pieces),
                    sorted(p.rank for p in m.sources)) for m in plan.matrices],
    }
    return out


def real_fsdp_tp(rank: int, world: int) -> dict:
    """A real FSDP2 + tensor-parallel model on a 2-D mesh (the layout FSDP2 builds over TP, with
    _StridedShard on the shared dimension), not hand-made placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dp, tp = (2, world // 2) if world % 2 == 0 else (1, world)
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    model = make_model()
    parallelize_module(model, mesh["tp"], {"a": ColwiseParallel(), "b": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    opt = make_optimizer(model)
    x_all = [batch(s) for s in range(STEPS)]
    for step in range(STEPS):
        x, y = x_all[step]
        # data parallel over dp only: the tp ranks of one dp group see the same rows
        r = dist.get_rank() // tp
        k = x.shape[0] // dp
        loss_fn(model, x[r * k:(r + 1) * k], y[r * k:(r + 1) * k]).backward()
        opt.step()
        opt.zero_grad()
    placements = {n: str(p.placements) for n, p in model.named_parameters() if hasattr(p, "placements")}
    out = full_params(model)
    out["__placements__"] = placements
    return out


def main() -> None:
    scenarios, rank, world, port, outdir = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    ckpt_dir = sys.argv[6] if len(sys.argv) > 6 else None
    torch.set_num_threads(1)
    import datetime

    timeout = datetime.timedelta(seconds=float(os.environ.get("MUONLAB_TEST_PG_TIMEOUT", "300")))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout)
    try:
        for sc in scenarios:
            res = run_scenario(sc, rank, world, ckpt_dir)
            torch.save(res, os.path.join(outdir, f"{sc}_rank{rank}.pt"))
            if sc == "stall":
                os._exit(0)  # the group is broken on purpose: no barrier, no clean shutdown
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_scenario(sc: str, rank: int, world: int, ckpt_dir) -> dict:
    if sc.startswith("layout:"):  # layout:NAME[:normuon]
        parts = sc.split(":")
        extra = {"normuon": True, "rms": True} if "normuon" in parts[2:] else {}
        return layout_run(parts[1], rank, world, **extra)
    if sc == "stall":  # the last rank stalls before a step: the others fail with a clear error, no hang
        import time

        model = make_model()
        opt = make_optimizer(model)
        train_steps(model, opt, rank, world, 0, 1, allreduce=True)
        x, y = batch(1)
        loss_fn(model, my_slice(x, rank, world), my_slice(y, rank, world)).backward()
        if rank == world - 1:  # stalls after its backward, before the optimizer step
            time.sleep(6)
            os._exit(0)
        t0 = time.perf_counter()
        try:
            opt.step()
        except Exception as e:  # noqa: BLE001 - the test reads the type and message
            return {"error": type(e).__name__, "message": str(e), "seconds": time.perf_counter() - t0}
        return {"error": None}
    if sc == "real_fsdp_tp":
        return real_fsdp_tp(rank, world)
    if sc == "replicated":
        model = make_model()
        opt = make_optimizer(model)
        train_steps(model, opt, rank, world, 0, STEPS, allreduce=True)
        return full_params(model)
    if sc == "fsdp_clip":  # the momentum clipping norm of a sharded buffer is the global norm
        model = fsdp_model(world)
        opt = make_optimizer(model, **CLIP)
        train_steps(model, opt, rank, world, 0, STEPS)
        return full_params(model)
    if sc == "nograd":
        model = make_model()
        opt = make_optimizer(model)
        train_steps(model, opt, rank, world, 0, STEPS, allreduce=True, nograd=True)
        return full_params(model)
    if sc == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(make_model())
        opt = make_optimizer(model.module)
        train_steps(model, opt, rank, world, 0, STEPS)
        return full_params(model)
    if sc == "fsdp":
        model = fsdp_model(world)
        opt = make_optimizer(model)
        train_steps(model, opt, rank, world, 0, STEPS)
        # the momentum stays sharded like its parameter
        st = opt.state[dict(model.named_parameters())["b.weight"]]
        assert type(st["momentum_buffer"]).__name__ == "DTensor", type(st["momentum_buffer"])
        return full_params(model)
    if sc.split(":")[0] in ("ckpt_save", "ckpt_load"):  # ckpt_save[:hsdp]: on a 2-D mesh
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model = fsdp_model(world, hsdp=sc.endswith(":hsdp"))
        sc = sc.split(":")[0]
        opt = make_optimizer(model)
        if sc == "ckpt_save":  # train STEPS steps, save, train STEPS more
            train_steps(model, opt, rank, world, 0, STEPS)
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
        else:  # load the checkpoint (saved at any world size), train the last STEPS steps
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=ckpt_dir)
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train_steps(model, opt, rank, world, STEPS, STEPS)
        return full_params(model)
    if sc == "nonfinite":  # a NaN gradient on the last rank only: every rank skips the step (no hang)
        model = make_model()
        opt = make_optimizer(model, nonfinite="skip")
        train_steps(model, opt, rank, world, 0, 2, allreduce=True)
        before = full_params(model)
        x, y = batch(2)
        loss_fn(model, my_slice(x, rank, world), my_slice(y, rank, world)).backward()
        if rank == world - 1:
            model.a.weight.grad[0, 0] = float("nan")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        opt.zero_grad()
        after = full_params(model)
        assert opt.skipped_steps == 1, opt.skipped_steps
        assert all(torch.equal(before[n], after[n]) for n in before)
        return after
    raise ValueError(sc)


if __name__ == "__main__":
    main()
