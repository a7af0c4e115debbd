"""Lab subcommands: ``compare`` (the main job), ``train`` and ``report``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


PARALLEL_MODES = ("none", "ddp", "fsdp", "hsdp", "tp", "fsdp+tp")  # muonlab.lab.parallel.MODES (kept import-free)


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return v


def _add_train_args(p: argparse.ArgumentParser, default_steps: int) -> None:
    p.add_argument("--model", default="tiny", help="model size name (micro, tiny, mini, small, medium, gpt2-small) [tiny]")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run [{default_steps}]")
    p.add_argument("--tokens", type=int, default=None, help="token budget per run (instead of --steps)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="context length [the model's]")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default="cosine")
    p.add_argument("--warmup", type=float, default=0.05, help="warmup steps (>=1) or fraction (<1)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps [steps/10]")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps [steps/4]")
    p.add_argument("--data", default=None, help="text file or folder [the Python standard library]")
    p.add_argument("--max-corpus-bytes", type=int, default=8 * 2**20)
    p.add_argument("--tokenizer", default="bytes", metavar="{bytes,bpe:N}",
                   help="bytes (vocabulary 256) or bpe:N, a byte-level BPE of N tokens (257..65536) trained on the "
                        "training split with Hugging Face tokenizers and cached beside the corpus; losses are also "
                        "reported in bits per byte [bytes]")
    p.add_argument("--weight-decay", type=float, default=None, metavar="WD",
                   help="weight decay of every parameter, as each optimizer's own weight_decay (decoupled in AdamW, "
                        "Lion and the Muon family) [the zoo's: 0]")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# flags that take a count: 0 or less is an error, never "use the default" (issue 13)
_POSITIVE_FLAGS = ("steps", "tokens", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                   "checkpoint_every", "max_corpus_bytes")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_positive(args: argparse.Namespace, names: tuple[str, ...] = _POSITIVE_FLAGS) -> None:
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"{_flag(name)} must be a positive integer, got {v}")


def _check_out(args: argparse.Namespace) -> None:
    if getattr(args, "out", None) is not None and not str(args.out).strip():
        raise ValueError("--out must name a folder, got an empty string")


def parse_seeds(text: str, flag: str = "--seeds") -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2); anything else is an error that says what a seed list looks like."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{flag} needs at least one seed, e.g. {flag} 0,1; got {text!r}")
    try:
        seeds = tuple(int(t) for t in items)
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers >= 0, e.g. {flag} 0,1; got {text!r}") from None
    if any(v < 0 for v in seeds):
        raise ValueError(f"{flag} must be comma-separated integers >= 0, e.g. {flag} 0,1; got {text!r}")
    dup = sorted({v for v in seeds if seeds.count(v) > 1})
    if dup:
        raise ValueError(f"{flag} lists seed {dup[0]} more than once: {text!r}")
    return seeds


def parse_fractions(text: str) -> tuple[float, ...]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        fractions = tuple(float(t) for t in items)
    except ValueError:
        fractions = ()
    if not fractions or any(not (0 < f <= 1.5) for f in fractions):
        raise ValueError(f"--fractions must be comma-separated numbers in (0, 1.5], e.g. 0.5,1.0; got {text!r}")
    return fractions


def _parse_floats(text: str, flag: str) -> tuple[float, ...]:
    """``"0.01,0.1"`` -> (0.01, 0.1): distinct finite numbers >= 0."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = tuple(float(t) for t in items)
    except ValueError:
        values = ()
    if not values or any(not (0 <= v < float("inf")) for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{flag} must be distinct comma-separated numbers >= 0, e.g. {flag} 0.01,0.1; got {text!r}")
    return values


def _base_config(args: argparse.Namespace, default_steps: int) -> Any:
    """The TrainConfig of the shared training flags. A flag given as 0 is an error (it used to mean
    "the default"); --tokens sets the number of steps, and the evaluation and checkpoint intervals
    that are not given follow the resulting number of steps."""
    from muonlab.lab.compare import steps_for_tokens
    from muonlab.lab.model import GPTConfig
    from muonlab.lab.train import TrainConfig

    _check_positive(args)
    _check_out(args)
    if args.steps is not None and args.tokens is not None:
        raise ValueError("give --steps or --tokens, not both")
    from muonlab.lab.data import canonical_tokenizer

    try:
        tokenizer = canonical_tokenizer(args.tokenizer)
    except ValueError as exc:
        raise ValueError(f"--tokenizer: {exc}") from None
    cfg = TrainConfig(
        model=args.model, steps=default_steps if args.steps is None else args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, grad_accum=args.grad_accum, schedule=args.schedule, warmup=args.warmup,
        eval_batches=args.eval_batches, data=args.data, max_corpus_bytes=args.max_corpus_bytes, device=args.device,
        tensorboard=args.tensorboard, tokenizer=tokenizer, weight_decay=args.weight_decay,
    )
    if args.tokens is not None:
        cfg.steps = steps_for_tokens(args.tokens, cfg, cfg.seq_len or GPTConfig.from_name(cfg.model).seq_len)
    cfg.eval_every = max(1, cfg.steps // 10) if args.eval_every is None else args.eval_every
    cfg.checkpoint_every = max(1, cfg.steps // 4) if args.checkpoint_every is None else args.checkpoint_every
    cfg.validate()  # every remaining value error before any work or any folder
    return cfg


DEFAULT_COMPARE_STEPS = 600


def cmd_compare(args: argparse.Namespace) -> int:
    from muonlab.lab.compare import compare

    base = _base_config(args, DEFAULT_COMPARE_STEPS)
    seeds = parse_seeds(args.seeds)
    weight_decays = _parse_floats(args.weight_decays, "--weight-decays") if args.weight_decays else ()
    if args.wd_top < 1:
        raise ValueError(f"--wd-top must be >= 1, got {args.wd_top}")
    compare(args.optimizers, base=base, sweep=args.sweep, seeds=seeds, out=args.out,
            baseline=args.baseline, weight_decays=weight_decays, wd_top=args.wd_top, progress=not args.quiet)
    return 0


def cmd_efficiency(args: argparse.Namespace) -> int:
    from muonlab.lab.compare import efficiency

    base = _base_config(args, DEFAULT_COMPARE_STEPS)
    fractions = parse_fractions(args.fractions)
    seeds = parse_seeds(args.seeds)
    multipliers = _parse_floats(args.lr_multipliers, "--lr-multipliers")
    if any(m <= 0 for m in multipliers):
        raise ValueError(f"--lr-multipliers must be positive, got {args.lr_multipliers!r}")
    efficiency(args.optimizer, args.baseline, base=base, fractions=fractions, sweep=not args.no_sweep, seeds=seeds,
               lr_multipliers=multipliers, out=args.out, progress=not args.quiet)
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from muonlab.lab.scaling import format_scaling, scaling

    if args.steps is not None or args.tokens is not None:
        raise ValueError("scaling sets each size's steps from --tokens-per-param; drop --steps/--tokens")
    if args.model != "tiny":
        raise ValueError("scaling trains every size of --sizes; drop --model")
    if not (args.tokens_per_param > 0 and args.tokens_per_param < float("inf")):
        raise ValueError(f"--tokens-per-param must be a positive number, got {args.tokens_per_param}")
    if args.min_steps < 1:
        raise ValueError(f"--min-steps must be >= 1, got {args.min_steps}")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    base = _base_config(args, DEFAULT_COMPARE_STEPS)
    res = scaling(sizes, args.optimizer, args.baseline, base=base, tokens_per_param=args.tokens_per_param,
                  min_steps=args.min_steps, fractions=parse_fractions(args.fractions), sweep=not args.no_sweep,
                  seeds_ends=parse_seeds(args.seeds_ends), seeds_middle=parse_seeds(args.seeds_middle), out=args.out,
                  progress=not args.quiet)
    print(format_scaling(res))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from muonlab.lab.train import train

    if args.seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {args.seed}")
    base = _base_config(args, DEFAULT_COMPARE_STEPS)
    cfg = replace(base, optimizer=args.optimizer, lr=args.lr, seed=args.seed, qk_clip=args.qk_clip)
    cfg.validate()
    out = Path(args.out) if args.out else Path("runs") / f"train-{args.optimizer}-{cfg.key()}"
    res = train(cfg, out, progress=not args.quiet, resume=not args.no_resume, log=print,
                parallel=args.parallel, mesh=args.mesh, dist_timeout=args.dist_timeout)
    if args.parallel != "none" and int(os.environ.get("RANK", "0")) != 0:
        return 0  # only rank 0 prints
    print(json.dumps(res, indent=2))
    print(f"run folder: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from muonlab.lab.report import write_report

    path = write_report(Path(args.dir))
    print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train a small GPT with each optimizer and compare (the main job)")
    p.add_argument("--optimizers", default="normuon,adamw", help="comma-separated zoo names [normuon,adamw]")
    _add_train_args(p, DEFAULT_COMPARE_STEPS)
    p.add_argument("--sweep", action="store_true", help="try 0.5x, 1x, 2x each default lr; keep the best")
    p.add_argument("--seeds", default="0", help="comma-separated seeds [0]")
    p.add_argument("--baseline", default=None, help="optimizer whose final loss is the target [adamw]")
    p.add_argument("--weight-decays", default=None, metavar="WD,WD",
                   help="then train the --wd-top best optimizers and the baseline again at their best lr with each "
                        "weight decay (every parameter), e.g. 0.01,0.1 [off]")
    p.add_argument("--wd-top", type=int, default=2, help="how many leaders get the weight-decay stage [2]")
    p.add_argument("--out", default=None, help="output folder [runs/compare-<time>]")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train", help="train the lab GPT with one optimizer")
    p.add_argument("--optimizer", default="normuon", help="zoo name [normuon]")
    p.add_argument("--lr", type=float, default=None, help="learning rate [the zoo default for the size]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder [runs/train-<optimizer>-<config hash>]")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--qk-clip", type=float, default=None, metavar="TAU",
                   help="QK-Clip (Kimi K2's MuonClip): after each step, scale the query/key weights of every head "
                        "whose max attention logit exceeded TAU; 'inf' logs max_attn_logit without clipping [off]")
    p.add_argument("--parallel", choices=list(PARALLEL_MODES), default="none",
                   help="how to spread the model over the ranks of a torchrun job (docs/distributed.md) [none]")
    p.add_argument("--mesh", default=None,
                   help="device mesh: W, or AxB for hsdp (replicas x shards) and fsdp+tp (data x tensor) "
                        "[all ranks; W/2 x 2 for the 2-D modes]")
    p.add_argument("--dist-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="how long a collective waits for a stalled or dead rank before the job stops with an "
                        "error naming it [600]")
    _add_train_args(p, DEFAULT_COMPARE_STEPS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="redraw plots and report.html of a compare or scaling folder from its files")
    p.add_argument("dir", help="folder written by `muonlab compare` or `muonlab scaling`")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("efficiency", help="tokens/time an optimizer needs to match the baseline's final loss")
    p.add_argument("--optimizer", default="normuon", help="zoo name [normuon]")
    p.add_argument("--baseline", default="adamw")
    p.add_argument("--fractions", default="0.4,0.5,0.67,0.8,1.0", help="budgets as fractions of --steps")
    p.add_argument("--no-sweep", action="store_true", help="use default learning rates only")
    p.add_argument("--lr-multipliers", default="0.5,1,2", metavar="M,M,M",
                   help="the sweep: multiples of each optimizer's default lr; widen it when a best lr is at an end "
                        "(the result and the log say so) [0.5,1,2]")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=None, help="output folder [runs/efficiency-<time>]")
    _add_train_args(p, DEFAULT_COMPARE_STEPS)
    p.set_defaults(func=cmd_efficiency)

    p = sub.add_parser("scaling", help="the efficiency measurement at several model sizes (token and time speed-up "
                                       "against parameters)")
    p.add_argument("--sizes", default="micro,tiny,mini,small", help="model sizes [micro,tiny,mini,small]")
    p.add_argument("--optimizer", default="normuon", help="zoo name [normuon]")
    p.add_argument("--baseline", default="adamw")
    p.add_argument("--tokens-per-param", type=float, default=4.0,
                   help="training tokens per non-embedding parameter of the baseline's run [4]")
    p.add_argument("--min-steps", type=int, default=100, help="fewest steps of any size's baseline run [100]")
    p.add_argument("--fractions", default="0.4,0.5,0.67,0.8,1.0", help="budgets as fractions of each size's steps")
    p.add_argument("--no-sweep", action="store_true", help="use default learning rates only")
    p.add_argument("--seeds-ends", default="0,1", help="seeds at the smallest and the largest size [0,1]")
    p.add_argument("--seeds-middle", default="0", help="seeds at the sizes between [0]")
    p.add_argument("--out", default=None, help="output folder (resumable) [runs/scaling-<time>]")
    _add_train_args(p, DEFAULT_COMPARE_STEPS)
    p.set_defaults(func=cmd_scaling)

    p = sub.add_parser("optimizers", help="list the optimizer zoo")
    p.set_defaults(func=cmd_optimizers)


def cmd_optimizers(args: argparse.Namespace) -> int:
    from muonlab.lab.tables import format_table
    from muonlab.lab.zoo import ZOO

    rows = [[e.name, e.family, e.lr_for("tiny"), e.description] for e in ZOO.values()]
    print(format_table(["name", "family", "lr (tiny)", "description"], rows))
    return 0
