"""Time one ``muonlab.Muon`` step at 1 and 2 ranks (gloo on CPU, or nccl on CUDA).

    python benchmarks/bench_distributed.py                                  # small + gpt2-small, 1 and 2 ranks
    python benchmarks/bench_distributed.py --models small --worlds 1,2,4 --repeats 5

For each parameter set (the lab model sizes, e.g. ``small`` and ``gpt2-small``: GPT-2-small shapes)
and world size, every rank builds the same model with the same random gradients (as after a DDP
all-reduce) and times ``opt.step()``: the median over ``--repeats`` steps after one warm-up. Each
rank reports its own step time, the time spent orthogonalizing the matrices it owns and the time
spent in the all_gather that shares the results (``Muon.last_dist_times``). ``world 1 (local)`` is
the plain single-process optimizer (no process group). Threads per rank: ``--threads`` (default:
the CPU count divided by the world size, so ranks do not oversubscribe the cores).

Writes ``--out`` (JSON, default docs/distributed_bench.json) and prints a Markdown table.
Nothing is asserted: this is a measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_name: str, repeats: int, threads: int, local: bool, out: str) -> None:
    from muonlab import Muon
    from muonlab.lab.model import GPT, GPTConfig

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if not local:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(model_name)).to(device)
    opt = Muon(model, lr=0.02, adamw_lr=1e-3, process_group=False if local else None)
    g = torch.Generator(device=device).manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
    times, ortho, comm = [], [], []
    for i in range(repeats + 1):
        if not local:
            dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i > 0:  # the first step is a warm-up (state allocation)
            times.append(dt)
            ortho.append(opt.last_dist_times.get("orthogonalize_s", float("nan")))
            comm.append(opt.last_dist_times.get("communicate_s", float("nan")))
    n_muon = sum(p.numel() for gr in opt.param_groups if gr["algorithm"] == "muon" for p in gr["params"])
    res = {"rank": rank, "step_s": statistics.median(times),
           "orthogonalize_s": None if local else statistics.median(ortho),
           "communicate_s": None if local else statistics.median(comm), "muon_params": n_muon,
           "params": sum(p.numel() for p in model.parameters())}
    Path(out, f"r{rank}.json").write_text(json.dumps(res))
    if not local:
        dist.destroy_process_group()


def run(model_name: str, world: int, repeats: int, threads: int, local: bool, tmp: Path) -> list[dict]:
    for f in tmp.glob("r*.json"):
        f.unlink()
    port = _free_port()
    # a fresh process per configuration, also for one rank: the allocator's state (glibc's mmap
    # threshold grows after the first large frees) otherwise favours whichever run comes later
    mp.spawn(_worker, args=(world, port, model_name, repeats, threads, local, str(tmp)), nprocs=world, join=True)
    return [json.loads((tmp / f"r{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,gpt2-small")
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads per rank [cpus / world]")
    ap.add_argument("--out", default="docs/distributed_bench.json")
    args = ap.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_distributed_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    rows = []
    for model_name in args.models.split(","):
        configs = [(1, True)] + [(int(w), False) for w in args.worlds.split(",")]
        for world, local in configs:
            threads = args.threads or max(1, cpus // world)
            res = run(model_name, world, args.repeats, threads, local, tmp)
            row = {"model": model_name, "world": world, "mode": "local" if local else "process group",
                   "threads_per_rank": threads, "step_s": max(r["step_s"] for r in res),
                   "orthogonalize_s_per_rank": [None if local else round(r["orthogonalize_s"], 4) for r in res],
                   "communicate_s_per_rank": [None if local else round(r["communicate_s"], 4) for r in res],
                   "muon_params": res[0]["muon_params"], "params": res[0]["params"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {cpus} CPUs",
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "repeats": args.repeats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print()
    print("| params | world | threads/rank | step (s, slowest rank) | orthogonalize per rank (s) | all_gather per rank (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        w = f"{r['world']}" + (" (local)" if r["mode"] == "local" else "")
        ortho = ", ".join(f"{v:.3f}" for v in r["orthogonalize_s_per_rank"]) if r["mode"] != "local" else "-"
        comm = ", ".join(f"{v:.3f}" for v in r["communicate_s_per_rank"]) if r["mode"] != "local" else "-"
        print(f"| {r['model']} ({r['params'] / 1e6:.1f}M, Muon {r['muon_params'] / 1e6:.1f}M) | {w} | "
              f"{r['threads_per_rank']} | {r['step_s']:.3f} | {ortho} | {comm} |")
    print(f"\nmachine: {meta['machine']}; torch {meta['torch']}; wrote {args.out}")


if __name__ == "__main__":
    main()
