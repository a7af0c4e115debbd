"""Analysis subcommands: ``paths``, ``memory``, ``spectrum`` and ``qk-clip-demo``.

``register(sub)`` adds them to an argparse subparsers object (as :mod:`muonlab.lab.cli` does for
``compare``/``train``); heavy imports happen when a command runs. Each command writes its data
file (JSON, and CSV for ``memory``) next to its PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_paths(args: argparse.Namespace) -> int:
    from muonlab import PRESETS
    from muonlab.lab.analysis.paths import (
        FUNCTIONS,
        parse_lr_overrides,
        parse_optimizers,
        parse_point,
        run_paths,
        write_paths,
    )
    from muonlab.lab.tables import format_table

    names = parse_optimizers(args.optimizers)
    lrs = parse_lr_overrides(args.lr)
    start = parse_point(args.start) if args.start else FUNCTIONS[args.function].default_start
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    muon_opts = {}
    if args.muon_ns == "svd":
        muon_opts = {"ns_method": "svd"}
    elif args.muon_ns != "keller":
        if args.muon_ns not in PRESETS:
            raise ValueError(f"--muon-ns must be svd or one of {', '.join(PRESETS)}; got {args.muon_ns!r}")
        muon_opts = {"ns_coefficients": args.muon_ns, "ns_steps": PRESETS[args.muon_ns].default_steps}
    paths = run_paths(names, args.function, start=start, steps=args.steps, lrs=lrs,
                      options={"muon": muon_opts} if muon_opts else None)
    png, data = write_paths(paths, args.function, start, args.steps, Path(args.out))
    rows = []
    for p in paths:
        last = [pt for pt in p.points if pt[0] is not None][-1]
        rows.append([p.name, p.lr, p.values[0], p.final_value if p.final_value is not None else float("nan"),
                     f"({last[0]:.4f}, {last[1]:.4f})", p.diverged_at or "-"])
    print(format_table(["optimizer", "lr", "f(start)", f"f after {args.steps}", "final point", "diverged at"], rows,
                       markdown=args.markdown))
    print(f"wrote {png} and {data}")
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from muonlab.lab.analysis.memory import TABLE_HEADERS, measure_all, model_summary, table_rows, write_memory
    from muonlab.lab.model import GPTConfig
    from muonlab.lab.tables import format_table
    from muonlab.lab.zoo import parse_optimizer_list

    mcfg = GPTConfig.from_name(args.model)  # a clear error for an unknown size before any work
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.seq_len < 1:
        raise ValueError(f"--seq-len must be a positive integer, got {args.seq_len}")
    if args.seq_len > mcfg.seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the {args.model} model's context length {mcfg.seq_len}")
    names = None if args.optimizers in (None, "all") else parse_optimizer_list(args.optimizers)
    summary = model_summary(args.model)
    print(f"model {args.model}: {summary['parameters']:,} parameters, {summary['param_bytes']:,} bytes; one step per optimizer")
    rows = measure_all(args.model, names, batch_size=args.batch_size, seq_len=args.seq_len,
                       log=None if args.quiet else print)
    out = Path(args.out) if args.out else Path(f"memory_{args.model}.png")
    files = write_memory(rows, summary, out)
    print(format_table(TABLE_HEADERS, table_rows(rows), markdown=args.markdown))
    skipped = [r for r in rows if r.status != "ok"]
    for r in skipped:
        print(f"note: {r.name} skipped: {r.note}")
    print(f"wrote {files['png']}, {files['csv']} and {files['json']}")
    return 0


def cmd_spectrum(args: argparse.Namespace) -> int:
    from muonlab.lab.analysis.convergence import parse_shape
    from muonlab.lab.analysis.spectrum import (
        SUMMARY_HEADERS,
        capture_lab_matrix,
        random_lowrank,
        summary_rows,
        update_spectra,
        write_spectra,
    )
    from muonlab.lab.tables import format_table

    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                        ("--max-bytes", args.max_bytes), ("--rank", args.rank)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if args.random_lowrank:
        cap = random_lowrank(parse_shape(args.shape), rank=args.rank, noise=args.noise, seed=args.seed)
    else:
        cap = capture_lab_matrix(args.param, model_name=args.model, steps=args.steps, batch_size=args.batch_size,
                                 seq_len=args.seq_len, max_bytes=args.max_bytes, data=args.data,
                                 matrix=args.matrix, seed=args.seed)
    spectra = update_spectra(cap)
    png, data = write_spectra(cap, spectra, Path(args.out))
    print(cap.source)
    print(format_table(SUMMARY_HEADERS, summary_rows(spectra), markdown=args.markdown))
    print(f"wrote {png} and {data}")
    return 0


def cmd_qk_clip_demo(args: argparse.Namespace) -> int:
    import math
    import time

    from muonlab.lab.analysis.qkclip import (
        PROBE_HEADERS,
        demo_configs,
        probe_rows,
        run_demo,
        table_headers,
        table_rows,
        write_demo,
    )
    from muonlab.lab.model import GPTConfig
    from muonlab.lab.tables import format_table

    mcfg = GPTConfig.from_name(args.model)  # a clear error for an unknown size before any work
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                        ("--eval-batches", args.eval_batches), ("--max-corpus-bytes", args.max_corpus_bytes)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if args.seq_len > mcfg.seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the {args.model} model's context length {mcfg.seq_len}")
    if not (0 < args.tau < math.inf):
        raise ValueError(f"--tau must be a positive finite number (the clipped run's threshold), got {args.tau}")
    for flag, value in (("--lr", args.lr), ("--adamw-lr", args.adamw_lr)):
        if value is not None and not (0 < value < math.inf):
            raise ValueError(f"{flag} must be a positive number, got {value}")
    if not (0 <= args.warmup < math.inf):
        raise ValueError(f"--warmup must be >= 0 (steps, or a fraction below 1), got {args.warmup}")
    if args.seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {args.seed}")
    if not 0 <= args.probes <= args.steps:
        raise ValueError(f"--probes must be between 0 and --steps ({args.steps}), got {args.probes}")
    if not str(args.out).strip():
        raise ValueError("--out must name a folder, got an empty string")
    cfgs = demo_configs(model=args.model, optimizer=args.optimizer, lr=args.lr, adamw_lr=args.adamw_lr, tau=args.tau,
                        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, warmup=args.warmup,
                        seed=args.seed, data=args.data, max_corpus_bytes=args.max_corpus_bytes,
                        eval_batches=args.eval_batches)
    t0 = time.perf_counter()
    data = run_demo(cfgs, Path(args.out), probes=args.probes, progress=not args.quiet,
                    log=None if args.quiet else print)
    png, js = write_demo(data, Path(args.out))
    print(format_table(table_headers(data), table_rows(data), markdown=args.markdown))
    if data["runs"]["clipped"]["probes"]:
        print(format_table(PROBE_HEADERS, probe_rows(data), markdown=args.markdown))
    print(f"wrote {png} and {js} ({time.perf_counter() - t0:.0f} s, runs cached in {args.out})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("paths", help="optimizer paths on the Rosenbrock function or an ill-conditioned quadratic")
    p.add_argument("--function", choices=["rosenbrock", "quadratic"], default="rosenbrock")
    p.add_argument("--optimizers", default="sgd-momentum,adamw,muon,lion",
                   help="comma-separated: sgd, sgd-momentum, nesterov, adam, adamw, rmsprop, adagrad, lion, muon "
                        "[sgd-momentum,adamw,muon,lion]")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps [500]")
    p.add_argument("--lr", default=None, help="per-optimizer learning rates, e.g. sgd-momentum=1e-3,muon=0.05")
    p.add_argument("--start", default=None,
                   help="start point X,Y; write --start=-1.5,2.5 for a negative X [the function's default]")
    p.add_argument("--muon-ns", default="keller",
                   help="Muon's orthogonalizer: svd (exact, step length = lr) or a preset name [keller]")
    p.add_argument("--out", default="paths.png", help="PNG to write; the path data goes to the same name .json")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=cmd_paths)

    p = sub.add_parser("memory", help="optimizer-state bytes of every zoo optimizer for a lab model")
    p.add_argument("--model", default="tiny", help="model size name (micro, tiny, mini, small, medium, gpt2-small) [tiny]")
    p.add_argument("--optimizers", default="all", help="comma-separated zoo names [all]")
    p.add_argument("--batch-size", type=int, default=2, help="batch for the one measured step [2]")
    p.add_argument("--seq-len", type=int, default=32, help="sequence length for that step [32]")
    p.add_argument("--out", default=None, help="PNG to write; .csv and .json beside it [memory_<model>.png]")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--quiet", action="store_true", help="no per-optimizer progress lines")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("spectrum", help="singular values of a gradient and of its Muon/AdamW/sign updates")
    p.add_argument("--random-lowrank", action="store_true", help="a random low-rank-plus-noise matrix instead")
    p.add_argument("--param", default="blocks.0.mlp.w1.weight", help="lab model matrix to capture")
    p.add_argument("--matrix", choices=["grad", "momentum"], default="grad",
                   help="the last gradient or AdamW's momentum m [grad]")
    p.add_argument("--model", default="tiny", help="model size name [tiny]")
    p.add_argument("--steps", type=int, default=20, help="AdamW steps before the capture [20]")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-bytes", type=int, default=200_000, help="corpus size cap [200000]")
    p.add_argument("--data", default=None, help="text file or folder [the Python standard library]")
    p.add_argument("--shape", default="256x96", help="--random-lowrank: matrix shape MxN [256x96]")
    p.add_argument("--rank", type=int, default=8, help="--random-lowrank: rank of the signal [8]")
    p.add_argument("--noise", type=float, default=1e-3, help="--random-lowrank: noise std [1e-3]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="spectrum.png", help="PNG to write; the numbers go to the same name .json")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=cmd_spectrum)

    from muonlab.lab.analysis.qkclip import DEFAULTS as QK  # the demo's settings, in one place

    p = sub.add_parser("qk-clip-demo",
                       help="a run pushed until its attention logits explode, with and without QK-Clip")
    p.add_argument("--model", default=QK["model"], help=f"model size name [{QK['model']}]")
    p.add_argument("--optimizer", default=QK["optimizer"], help=f"zoo name [{QK['optimizer']}]")
    p.add_argument("--lr", type=float, default=QK["lr"], help=f"learning rate (Muon's matrices) [{QK['lr']}]")
    p.add_argument("--adamw-lr", type=float, default=QK["adamw_lr"], help="lr of the AdamW part [the zoo default]")
    p.add_argument("--tau", type=float, default=QK["tau"],
                   help=f"QK-Clip threshold of the clipped run [{QK['tau']:g}]")
    p.add_argument("--steps", type=int, default=QK["steps"], help=f"optimizer steps per run [{QK['steps']}]")
    p.add_argument("--batch-size", type=int, default=QK["batch_size"], help=f"[{QK['batch_size']}]")
    p.add_argument("--seq-len", type=int, default=QK["seq_len"], help=f"context length [{QK['seq_len']}]")
    p.add_argument("--warmup", type=float, default=QK["warmup"],
                   help=f"warmup steps (>=1) or fraction (<1), then a constant lr [{QK['warmup']}]")
    p.add_argument("--seed", type=int, default=QK["seed"])
    p.add_argument("--probes", type=int, default=QK["probes"],
                   help="how many steps (spread evenly, the last included) to re-measure the max logit at, after "
                        f"the update and the clip, on the step's own batch (0: none) [{QK['probes']}]")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches [8]")
    p.add_argument("--data", default=None, help="text file or folder [the Python standard library]")
    p.add_argument("--max-corpus-bytes", type=int, default=8 * 2**20)
    p.add_argument("--out", default="runs/qkclip-demo",
                   help="folder for both runs (reused when run again) and qkclip_demo.png/.json [runs/qkclip-demo]")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_qk_clip_demo)
