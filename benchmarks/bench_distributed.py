"""Sharded Muon at 1, 2 and 4 ranks: per-rank step memory, bytes sent and step time.

    python benchmarks/bench_distributed.py                               # stack60 + small + gpt2-small, FSDP2, 1/2/4 ranks
    python benchmarks/bench_distributed.py --models stack60 --worlds 1,2,4 --repeats 3
    # the design before the sharded engine (gather every full matrix to every rank), side by side:
    git worktree add /tmp/muonlab-old a222066 && \
    python benchmarks/bench_distributed.py --old-src /tmp/muonlab-old/src

Every rank builds the same model, shards it with FSDP2 (``fully_shard`` per layer, or ``--shard ddp``
for plain replicated parameters), gives every parameter a random gradient and runs ``opt.step()``
``1 + repeats`` times. On the second step (state already allocated) a ``TorchDispatchMode`` counts

* **peak bytes**: the largest total size of tensors created during the step and alive at the same
  time (views of one storage count once; tensors that existed before the step are not counted);
* **bytes sent**: what the collectives of the step send out of the rank (all_to_all: the input
  minus the rank's own part; all_gather: the input times world - 1; all_reduce: 2 (world - 1) / world
  times the input, as a ring does).

``step_s`` is the median step time over the repeats (no dispatch mode then). Models: ``stack60``
(15 Linear 1024x1024 layers, 60 MiB fp32, the issue's case), the lab sizes (``small``) and
``gpt2-small`` (GPT-2 small's shapes). Each configuration runs in fresh processes. Nothing is
asserted: this is a measurement, not a test. Writes ``--out`` (JSON) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StepMeter(TorchDispatchMode):
    """Counts the live bytes of tensors created under it (peak) and the bytes its collectives send."""

    def __init__(self, world: int, rank: int) -> None:
        super().__init__()
        self.world, self.rank = world, rank
        self.live: dict[int, list[int]] = {}  # storage key -> [bytes, tensor objects alive]
        self.current = self.peak = 0
        self.sent = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor, input_keys: set) -> None:
        if hasattr(t, "_local_tensor"):  # a DTensor: its local storage is what was allocated
            t = t._local_tensor
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
        except (RuntimeError, NotImplementedError):
            return
        if key == 0 or (key in input_keys and key not in self.live):
            return  # in-place or a view of a tensor that existed before the step
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [st.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _count_sent(self, name: str, args: tuple, kwargs: dict) -> None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        w = self.world
        if "alltoall" in name or "all_to_all" in name:
            inp = tensors[1] if len(tensors) >= 2 else tensors[0]  # (output, input, ...) or (input, ...)
            splits = [a for a in args if isinstance(a, (list, tuple)) and (not a or isinstance(a[0], int))]
            n = inp.numel()
            if len(splits) >= 2 and splits[1]:
                rows = inp.numel() // max(1, inp.shape[0])
                own = splits[1][self.rank] * rows
            else:
                own = n // w
            self.sent += (n - own) * inp.element_size()
        elif "gather" in name:
            # c10d.allgather_ takes lists (its input list last); the tensor forms take the input last
            inp = lists[-1][0] if lists else (tensors[-1] if tensors else None)
            if inp is not None:
                self.sent += inp.numel() * inp.element_size() * (w - 1)
        elif "allreduce" in name or "all_reduce" in name:
            for t in tensors + [x for ls in lists for x in ls]:
                self.sent += int(t.numel() * t.element_size() * 2 * (w - 1) / w)
        elif "reduce_scatter" in name:
            for t in tensors[-1:]:
                self.sent += int(t.numel() * t.element_size() * (w - 1) / w)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if "c10d" in name:
            self._count_sent(name, args, kwargs)
        input_keys = set()
        for a in list(args) + list(kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    try:
                        input_keys.add((t._local_tensor if hasattr(t, "_local_tensor") else t).untyped_storage().data_ptr())
                    except (RuntimeError, NotImplementedError):
                        pass  # a storage-less tensor
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor):
                self._track(t, input_keys)
        return out


def build(model_name: str, device: torch.device):
    """(model, Muon param groups or the model itself for routing)."""
    from torch import nn

    torch.manual_seed(0)
    if model_name == "stack60":
        model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(15)]).to(device)
        return model, list(model), None
    from muonlab.lab.model import GPT, GPTConfig

    model = GPT(GPTConfig.from_name(model_name)).to(device)
    return model, list(model.blocks), model


def _worker(rank: int, world: int, port: int, model_name: str, shard: str, repeats: int, threads: int,
            old_src: str, out: str) -> None:
    if old_src:
        sys.path.insert(0, old_src)
    from muonlab import Muon

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    model, layers, routed = build(model_name, device)
    if shard == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if routed is None:
        params = [(n, p) for n, p in model.named_parameters()]
        opt = Muon([{"params": params, "algorithm": "muon"}], lr=0.02)
    else:
        opt = Muon(model, lr=0.02, adamw_lr=1e-3)
    g = torch.Generator(device=device).manual_seed(1 + rank)
    for p in model.parameters():
        loc = p.to_local() if hasattr(p, "to_local") else p
        grad = torch.randn(loc.shape, generator=g, device=device) * 1e-3
        if hasattr(p, "to_local"):
            from torch.distributed.tensor import DTensor

            grad = DTensor.from_local(grad, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        p.grad = grad
    muon_bytes = sum(p.numel() * p.element_size() for gr in opt.param_groups if gr["algorithm"] == "muon"
                     for p in gr["params"])
    opt.step()  # warm-up: state allocation (and the plan)
    dist.barrier()
    meter = StepMeter(world, rank)
    with meter:
        opt.step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    plan = getattr(opt, "last_shard_plan", None)
    res = {"rank": rank, "peak_bytes": meter.peak, "sent_bytes": meter.sent,
           "plan_sent_bytes": plan.sent_bytes[rank] if plan is not None else None,
           "rounds": plan.rounds if plan is not None else None,
           "step_s": statistics.median(times) if times else None, "muon_bytes": muon_bytes,
           "params": sum(p.numel() for p in model.parameters())}
    Path(out, f"r{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def run(model_name: str, shard: str, world: int, repeats: int, threads: int, old_src: str, tmp: Path) -> list[dict]:
    for f in tmp.glob("r*.json"):
        f.unlink()
    mp.spawn(_worker, args=(world, _free_port(), model_name, shard, repeats, threads, old_src, str(tmp)),
             nprocs=world, join=True)
    return [json.loads((tmp / f"r{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="stack60,small,gpt2-small")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--shard", choices=("fsdp", "ddp"), default="fsdp")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps after the measured one (0: no timing)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads per rank [cpus / world]")
    ap.add_argument("--old-src", default="", help="also run the muonlab found in this src/ folder (label 'old')")
    ap.add_argument("--out", default="docs/distributed_bench.json")
    args = ap.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_distributed_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    impls = [("new", "")] + ([("old", str(Path(args.old_src).resolve()))] if args.old_src else [])
    rows = []
    for model_name in args.models.split(","):
        for world in [int(w) for w in args.worlds.split(",")]:
            for impl, src in impls:  # old and new side by side, one configuration after the other
                threads = args.threads or max(1, cpus // world)
                t0 = time.perf_counter()
                res = run(model_name, args.shard, world, args.repeats, threads, src, tmp)
                row = {"model": model_name, "impl": impl, "shard": args.shard, "world": world, "threads_per_rank": threads,
                       "peak_bytes_per_rank": [r["peak_bytes"] for r in res],
                       "sent_bytes_per_rank": [r["sent_bytes"] for r in res],
                       "plan_sent_bytes_per_rank": [r["plan_sent_bytes"] for r in res],
                       "rounds": res[0]["rounds"],
                       "step_s": max(r["step_s"] for r in res) if res[0]["step_s"] is not None else None,
                       "muon_bytes": res[0]["muon_bytes"], "params": res[0]["params"],
                       "wall_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {cpus} CPUs",
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "repeats": args.repeats, "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    mib = 2**20
    print("\n| model (Muon MiB) | impl | world | peak step MiB per rank (max) | vs 1 rank | sent MiB per rank (max) | "
          "sent / (Muon bytes / W) | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["impl"] == r["impl"] and b["world"] == 1) \
            if any(b["model"] == r["model"] and b["impl"] == r["impl"] and b["world"] == 1 for b in rows) else None
        peak = max(r["peak_bytes_per_rank"])
        ratio = f"{peak / max(base['peak_bytes_per_rank']):.2f}" if base else "-"
        sent = max(r["sent_bytes_per_rank"])
        per = r["muon_bytes"] / r["world"]
        step = f"{r['step_s']:.3f}" if r["step_s"] is not None else "-"
        print(f"| {r['model']} ({r['muon_bytes'] / mib:.0f}) | {r['impl']} | {r['world']} | {peak / mib:.1f} | {ratio} | "
              f"{sent / mib:.1f} | {sent / per:.2f} | {step} |")
    print(f"\nmachine: {meta['machine']}; torch {meta['torch']}; wrote {args.out}")


if __name__ == "__main__":
    main()
