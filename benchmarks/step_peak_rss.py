"""Peak resident memory of a process that takes Muon steps on GPT-2-small's shapes (CPU).

    python benchmarks/step_peak_rss.py                 # 12 layers, default Muon (NorMuon)
    python benchmarks/step_peak_rss.py --layers 4 --steps 3

Not a test: nothing is asserted. ``ru_maxrss`` (the process's peak) is read once the parameters and
gradients exist, and after the steps: the growth, less the optimizer state the steps created, is
what the steps' temporaries took at their peak. To compare two versions of the code, run the script
from each checkout (``PYTHONPATH=<checkout>/src``), each in its own process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import gpt2_set  # noqa: E402

from muonlab import Muon  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12, help="GPT-2 layers of matrices (default 12)")
    ap.add_argument("--steps", type=int, default=2, help="steps after the first (default 2)")
    ap.add_argument("--plain", action="store_true", help="plain Muon (normuon=False)")
    args = ap.parse_args(argv)
    pset = gpt2_set(args.layers, torch.device("cpu"))
    params = [torch.nn.Parameter(torch.zeros(s)) for s in pset.shapes]
    for p, g in zip(params, pset.grads):
        p.grad = g
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bare tensors: every matrix goes to Muon, which is the point here
        opt = Muon([{"params": params, "algorithm": "muon"}], lr=0.02, normuon=not args.plain)
    elements = sum(p.numel() for p in params)
    before = peak_mb()
    for _ in range(1 + args.steps):
        opt.step()
    after = peak_mb()
    state = opt.state_bytes() / 2**20
    print(f"{len(params)} matrices, {elements / 1e6:.1f}M elements ({elements * 4 / 2**20:.0f} MiB in fp32); "
          f"optimizer state {state:.0f} MiB")
    print(f"peak RSS with parameters and gradients: {before:.0f} MiB; after {1 + args.steps} step{'s' if args.steps else ''}: {after:.0f} MiB; "
          f"the steps' temporaries at their peak: {after - before - state:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
