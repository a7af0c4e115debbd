"""Time every orthogonalizer of ``muonlab.orthogonalize`` and compare with the matmul peak.

    python benchmarks/bench_orthogonalize.py                       # default shapes, fp32 on CPU
    python benchmarks/bench_orthogonalize.py --shapes 256x256,16x256x256 --repeats 5 --out bench.md

For every shape (``MxN`` or ``BxMxN`` for a batch) and method it reports the median wall time of
``--repeats`` runs after one warm-up, the achieved GFLOP/s of the matrix products the method does
(Newton-Schulz, Gram and the coupled iteration; the SVD-based ones have no comparable count), the
measured GFLOP/s of one plain matmul with the same shapes and dtype (the machine's reference), and
the relative Frobenius error against the float64 SVD polar factor U Vᵀ.

FLOP counts, with m the short side and n the long side, per matrix (times the batch size):

* newton_schulz, one step: A = X Xᵀ (2m²n) + A² (2m³, skipped when c = 0) + B X (2m²n)
* gram: A₀ = X Xᵀ (2m²n) + per step A² (2m³), Q P (2m³, not on the first step), Q A Q (4m³)
  + the final P X (2m²n)
* inverse_sqrt: A = X Xᵀ (2m²n) + per step Z Y, Y T, T Z (6m³) + the final Z X (2m²n)

On a CPU shared with other jobs, ``--threads 1 --clock cpu`` gives stable numbers (process CPU
time instead of wall time).

On CPU fp32 is used (bf16 matmuls are much slower there); on CUDA the benchmark also runs bf16.
Nothing is asserted: this is a measurement script, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from muonlab import orthogonalize, resolve_schedule

DEFAULT_SHAPES = "256x256,1024x1024,768x3072,16x256x256"


@dataclass
class Case:
    label: str
    method: str  # "torch.linalg.svd" for the bare decomposition
    coefficients: str = "keller"
    steps: int = 5


CASES = [
    Case("newton_schulz keller×5", "newton_schulz", "keller", 5),
    Case("newton_schulz polar_express×5", "newton_schulz", "polar_express", 5),
    Case("newton_schulz polar_express×8", "newton_schulz", "polar_express", 8),
    Case("gram keller×5", "gram", "keller", 5),
    Case("inverse_sqrt ×5", "inverse_sqrt", "keller", 5),
    Case("svd", "svd"),
    Case("svd_inv_sqrt", "svd_inv_sqrt"),
    Case("torch.linalg.svd", "torch.linalg.svd"),
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            dims = tuple(int(p) for p in item.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) not in (2, 3) or min(dims) < 1:
            raise SystemExit(f"bad shape {item!r}: use MxN or BxMxN with positive integers")
        shapes.append(dims)
    if not shapes:
        raise SystemExit("no shapes given")
    return shapes


def flops(case: Case, shape: tuple[int, ...]) -> Optional[float]:
    batch = shape[0] if len(shape) == 3 else 1
    m, n = sorted(shape[-2:])
    k = case.steps
    if case.method == "newton_schulz":
        total = 0.0
        for _, _, c in resolve_schedule(case.coefficients, k):
            total += 4 * m * m * n + (2 * m**3 if c != 0.0 else 0)
    elif case.method == "gram":
        has_c = [c != 0.0 for _, _, c in resolve_schedule(case.coefficients, k)]
        total = 4 * m * m * n + sum((2 * m**3 if hc else 0) + 4 * m**3 for hc in has_c) + 2 * m**3 * (k - 1)
    elif case.method == "inverse_sqrt":
        total = 4 * m * m * n + 6 * k * m**3
    else:
        return None
    return float(batch * total)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# "wall": time.perf_counter. "cpu": time.process_time, the CPU time of this process summed over
# its threads; with --threads 1 on a CPU that other jobs share, it is what the wall time would be
# on an idle machine (other processes' load does not count), so timings stay comparable.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def time_it(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        sync(device)
        times.append(clock() - t0)
    return statistics.median(times)


def matmul_gflops(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Measured GFLOP/s of X Xᵀ for X of the given (short side first) shape: the reference rate."""
    batch = shape[0] if len(shape) == 3 else 1
    m, n = sorted(shape[-2:])
    X = torch.randn(batch, m, n, device=device).to(dtype)
    Y = X.mT.contiguous()
    t = time_it(lambda: torch.bmm(X, Y), device, max(repeats, 3))
    return 2 * batch * m * m * n / t / 1e9


def polar_ref(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.detach().cpu().double(), full_matrices=False)
    return U @ Vh


def run_shape(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, repeats: int, seed: int
) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    G64 = torch.randn(*shape, generator=gen, dtype=torch.float64)
    ref = polar_ref(G64)
    ref_norm = float(ref.norm())
    G = G64.to(device=device, dtype=dtype)
    peak = matmul_gflops(shape, dtype, device, repeats)
    rows = []
    for case in CASES:
        if case.method == "torch.linalg.svd":
            Gs = G.float() if dtype in (torch.bfloat16, torch.float16) else G  # no low-precision SVD

            def fn(Gs: torch.Tensor = Gs) -> torch.Tensor:
                return torch.linalg.svd(Gs, full_matrices=False)[0]

            def polar(Gs: torch.Tensor = Gs) -> torch.Tensor:
                U, _, Vh = torch.linalg.svd(Gs, full_matrices=False)
                return U @ Vh

            out = polar()
        else:

            def fn(case: Case = case) -> torch.Tensor:
                return orthogonalize(G, case.method, case.coefficients, case.steps, dtype=dtype)  # type: ignore[arg-type]

            out = fn()
        err = float((out.detach().cpu().double() - ref).norm()) / ref_norm
        seconds = time_it(fn, device, repeats)
        f = flops(case, shape)
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "dtype": str(dtype).replace("torch.", ""),
                "device": device.type,
                "method": case.label,
                "ms": seconds * 1e3,
                "gflops": (f / seconds / 1e9) if f is not None else None,
                "peak": peak,
                "err": err,
            }
        )
        print(
            f"  {rows[-1]['shape']:>12} {rows[-1]['dtype']:>8} {case.label:<30} {seconds * 1e3:10.2f} ms"
            f"  {('%8.1f' % rows[-1]['gflops']) if f is not None else '       -'} GFLOP/s"
            f"  (matmul {peak:7.1f})  err {err:.2e}",
            flush=True,
        )
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| shape | dtype | device | method | ms (median) | GFLOP/s | matmul GFLOP/s | rel. error vs fp64 SVD |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        gf = f"{r['gflops']:.1f}" if r["gflops"] is not None else "-"
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['device']} | {r['method']} | {r['ms']:.2f} | {gf} "
            f"| {r['peak']:.1f} | {r['err']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated MxN or BxMxN (default {DEFAULT_SHAPES})")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case after one warm-up (default 3)")
    parser.add_argument("--out", metavar="FILE.md", help="also write a Markdown table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-cuda", action="store_true", help="CPU only even if CUDA is available")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall (default) or cpu: process CPU time, robust to other jobs on a shared CPU with --threads 1",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.clock == "cpu" and torch.cuda.is_available() and not args.no_cuda:
        parser.error("--clock cpu measures CPU work only; add --no-cuda")
    global clock
    clock = CLOCKS[args.clock]
    shapes = parse_shapes(args.shapes)
    if args.threads:
        torch.set_num_threads(args.threads)

    configs = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available() and not args.no_cuda:
        configs.append((torch.device("cuda"), torch.bfloat16))
    machine = (
        f"{cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}, {args.clock} clock"
    )
    if torch.cuda.is_available() and not args.no_cuda:
        machine += f", CUDA device {torch.cuda.get_device_name()}"
    print(f"machine: {machine}")
    rows: list[dict] = []
    t_start = time.perf_counter()
    for device, dtype in configs:
        for shape in shapes:
            rows += run_shape(shape, dtype, device, args.repeats, args.seed)
    total = time.perf_counter() - t_start
    print(f"total {total:.1f} s")
    if args.out:
        command = "python benchmarks/bench_orthogonalize.py " + " ".join(sys.argv[1:] if argv is None else argv)
        header = f"`{command.strip()}` on {machine} (repeats {args.repeats}, whole run {total:.0f} s)"
        Path(args.out).write_text(markdown(rows, header))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
