"""The ``muonlab`` command line. Each subcommand imports its (heavier) module only when run."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Optional


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
    for flag, value in (("--steps", args.steps), ("--iterations", args.iterations), ("--matrices", args.matrices)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
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


def _cmd_route(args: argparse.Namespace) -> int:
    try:
        from muonlab.integrations.hf import build_model, load_overrides
    except ImportError:
        raise ImportError(
            "the route command builds models with transformers, which is not installed: "
            "pip install 'muonlab[integrations]'"
        ) from None
    import transformers

    from muonlab import Muon, muon_param_groups

    views = {}
    for item in args.view or []:
        pattern, sep, view = item.partition("=")
        if not sep or not pattern or not view:
            raise ValueError(f"--view takes PATTERN=VIEW (e.g. '*.q_b_proj.weight=heads:16'), got {item!r}")
        views[pattern] = view
    overrides = load_overrides(args.config) if args.config else {}
    model = build_model(args.arch, overrides, task=args.task, device="meta")  # shapes only: any size, no memory
    groups = muon_param_groups(model, adamw=args.adamw or (), muon=args.muon or (), views=views)
    n = sum(p.numel() for p in model.parameters())
    name = args.arch or overrides.get("model_type")
    print(f"{type(model).__name__} ({name}, transformers {transformers.__version__}): {n:,} parameters, "
          "random, shapes only (built on the meta device)")
    print(Muon(groups).routing_report())
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

    p = sub.add_parser("route", help="routing report of a small random transformers model (needs muonlab[integrations])")
    p.add_argument("--arch", help="a transformers model_type: llama, gpt2, bert, t5, vit, mixtral, qwen3_moe, deepseek_v3, mamba, ...")
    p.add_argument("--config", metavar="JSON", help="config fields over the small defaults (a full config.json works: shapes only)")
    p.add_argument("--task", default="auto", choices=["auto", "causal-lm", "seq2seq", "masked-lm", "image-classification", "base"],
                   help="which head to build (default: auto)")
    p.add_argument("--muon", action="append", metavar="PATTERN", help="route matching parameters to Muon (repeatable)")
    p.add_argument("--adamw", action="append", metavar="PATTERN", help="route matching parameters to AdamW (repeatable)")
    p.add_argument("--view", action="append", metavar="PATTERN=VIEW", help="a logical view, e.g. '*.q_b_proj.weight=heads:4'")
    p.set_defaults(func=_cmd_route)

    _register_more(sub)
    # --debug before or after the command name: a failure then shows Python's traceback
    debug_help = "on failure, show the Python traceback instead of a one-line error"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def _register_more(sub: argparse._SubParsersAction) -> None:
    # argparse wiring only; heavy imports happen when a command runs
    from muonlab.lab.analysis.cli import register as register_analysis
    from muonlab.lab.cli import register as register_lab

    register_lab(sub)
    register_analysis(sub)


def _os_error_message(exc: OSError) -> str:
    """``No space left on device: /run/checkpoint.pt.tmp`` rather than ``[Errno 28] ...``."""
    if exc.strerror and exc.filename is not None:
        where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        return f"{exc.strerror}: {where}"
    return str(exc) or type(exc).__name__


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an exception that ended a command.

    2: the input was wrong (a bad value, a missing file, a missing optional package);
    1: the run failed (a busy folder, a damaged checkpoint, a full disk, a diverged run, anything else).
    """
    # the lab's own failure type, looked up only if the lab was imported (no heavy import here)
    lab_error = getattr(sys.modules.get("muonlab.lab.train"), "LabError", None)
    if isinstance(exc, FileNotFoundError):
        code, msg = 2, (_os_error_message(exc) if exc.filename is not None else str(exc))
    elif isinstance(exc, (ValueError, TypeError, ImportError)):
        code, msg = 2, str(exc)
    elif lab_error is not None and isinstance(exc, lab_error):
        code, msg = 1, str(exc)
    elif isinstance(exc, FloatingPointError):
        code, msg = 1, f"training diverged: {exc}"
    elif isinstance(exc, OSError):
        code, msg = 1, _os_error_message(exc)
    else:  # not a failure we know: say what it is, and where the full story is
        code, msg = 1, f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
    return code, " ".join((msg or type(exc).__name__).split())  # one line, whatever the message held


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    prog = f"muonlab {args.command}"
    debug = bool(getattr(args, "debug", False))

    def one_line_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                         line: Optional[str] = None) -> None:
        kind = "" if category is UserWarning else f"{category.__name__}: "
        print(f"{prog}: warning: {kind}{' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:  # --debug keeps Python's warnings, with file and line
            warnings.showwarning = one_line_warning
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            if debug:
                raise
            code, msg = describe_failure(exc)
            print(f"{prog}: error: {msg}", file=sys.stderr)
            return code


if __name__ == "__main__":
    raise SystemExit(main())
