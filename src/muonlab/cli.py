"""The ``muonlab`` command line. Each subcommand imports its (heavier) module only when run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional


def _cmd_ns_convergence(args: argparse.Namespace) -> int:
    import torch

    from muonlab.lab.analysis.convergence import (
        ns_convergence,
        parse_shape,
        plot_convergence,
        write_json,
    )
    from muonlab.lab.tables import format_table

    shape = parse_shape(args.shape)
    dtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}[args.dtype]
    rows = ns_convergence(shape, args.steps, seed=args.seed, spectrum=args.spectrum, dtype=dtype)
    shown = sorted({1, 2, 3, 5, args.steps} & set(range(1, args.steps + 1)))
    headers = ["method", "preset"] + [f"err@{k}" for k in shown] + ["min σ", "max σ"]
    table = [
        [r.method, r.preset] + [r.errors[k - 1] for k in shown] + [r.sigma_min, r.sigma_max] for r in rows
    ]
    print(
        f"Newton-Schulz convergence on a {shape[0]}x{shape[1]} {args.spectrum} matrix "
        f"(iteration dtype {args.dtype}, seed {args.seed}); error = ‖X_k − UVᵀ‖_F / ‖UVᵀ‖_F, "
        f"σ band after {args.steps} steps"
    )
    print(format_table(headers, table, markdown=args.markdown))
    meta = {"shape": list(shape), "steps": args.steps, "seed": args.seed, "spectrum": args.spectrum, "dtype": args.dtype}
    if args.json:
        write_json(rows, Path(args.json), meta)
        print(f"wrote {args.json}")
    if args.plot:
        plot_convergence(rows, Path(args.plot), f"{shape[0]}x{shape[1]} {args.spectrum}, {args.dtype}")
        print(f"wrote {args.plot}")
    return 0


def _cmd_fit_coefficients(args: argparse.Namespace) -> int:
    import torch

    from muonlab import PRESETS, resolve_schedule, scalar_map
    from muonlab.coefficients import _sample_singular_values, fit_coefficients
    from muonlab.lab.analysis.convergence import parse_shape
    from muonlab.lab.tables import format_table

    shape = parse_shape(args.shape)
    result = fit_coefficients(
        shape, args.steps, n_matrices=args.matrices, iterations=args.iterations, lr=args.lr, seed=args.seed,
        progress=not args.quiet,
    )
    # score every schedule on fresh samples (a different seed from the fit)
    sigma = _sample_singular_values(shape, args.matrices, torch.Generator().manual_seed(args.seed + 1))

    def score(schedule: list) -> tuple[float, float, float]:
        y = scalar_map(sigma, schedule)
        return float(((y - 1) ** 2).mean()), float(y.min()), float(y.max())

    rows = []
    a, b, c = result.coefficients
    rows.append(["fitted", f"({a:.4f}, {b:.4f}, {c:.4f})", *score([result.coefficients] * args.steps)])
    for name, preset in PRESETS.items():
        sched = resolve_schedule(name, args.steps)
        shown = f"({sched[0][0]:.4f}, {sched[0][1]:.4f}, {sched[0][2]:.4f})" + (" ..." if len(set(sched)) > 1 else "")
        rows.append([name, shown, *score(sched)])
    k, x1, x2 = result.k_x1_x2
    print(
        f"Fitted quintic for {shape[0]}x{shape[1]}, {args.steps} steps: a={a:.4f} b={b:.4f} c={c:.4f} "
        f"(k={k:.4f}, x1={x1:.4f}, x2={x2:.4f}); objective {result.initial_loss:.4g} -> {result.loss:.4g}"
    )
    print(format_table(["schedule", "(a, b, c)", "mean (g(σ)-1)²", "min g(σ)", "max g(σ)"], rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muonlab", description="Muon optimizer library and lab")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("ns-convergence", help="error per iteration of every orthogonalizer and preset")
    p.add_argument("--shape", default="512x512", help="matrix shape MxN (default 512x512)")
    p.add_argument("--steps", type=int, default=8, help="iterations to report (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spectrum", choices=["gaussian", "powerlaw"], default="gaussian")
    p.add_argument("--dtype", choices=["fp32", "fp64", "bf16"], default="fp32", help="iteration dtype")
    p.add_argument("--plot", metavar="PNG", help="also draw error vs iteration and the scalar maps")
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=_cmd_ns_convergence)

    p = sub.add_parser("fit-coefficients", help="fit a quintic (a, b, c) by gradient descent (seed 000)")
    p.add_argument("--shape", default="1024x1024", help="matrix shape MxN (default 1024x1024)")
    p.add_argument("--steps", type=int, default=5, help="Newton-Schulz steps (default 5)")
    p.add_argument("--iterations", type=int, default=2000, help="gradient-descent iterations")
    p.add_argument("--matrices", type=int, default=8, help="random matrices sampled for singular values")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fit_coefficients)

    _register_more(sub)
    return parser


def _register_more(sub: argparse._SubParsersAction) -> None:
    # argparse wiring only; heavy imports happen when a command runs
    from muonlab.lab.analysis.cli import register as register_analysis
    from muonlab.lab.cli import register as register_lab

    register_lab(sub)
    register_analysis(sub)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"muonlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"muonlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
