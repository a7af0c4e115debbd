"""One optimizer step of every Muon implementation at hand, side by side in one process.

    python benchmarks/bench_peers.py                         # lab model + GPT-2-small shapes, a few minutes on 2 cores
    python benchmarks/bench_peers.py --quick                 # < 1 minute: fewer repeats, 2 GPT-2 layers
    python benchmarks/bench_peers.py --sizes gpt2 --repeats 9 --out docs/peers_cpu   # writes .md and .json
    python benchmarks/bench_peers.py --device cuda           # on a GPU (benchmarks/gpu_suite.sh runs this)

Not a test: nothing is asserted. The peers are benchmark-only dependencies (``pip install
'muonlab[bench]'``: heavyball, pytorch-optimizer); a peer that is not installed is listed as
skipped. The library never imports them.

Contenders (every one on the same matrices, all routed to Muon; AdamW is not part of the step):

* ``torch.optim.Muon`` as shipped: Keller's quintic x5, always in bf16, one matrix at a time.
  Every ratio below is "its step time / this one's".
* ``heavyball.Muon`` (3.x): its own 5-step schedule, bf16 with stochastic rounding. Eager by
  default (``heavyball.utils.compile_mode = None``); ``--heavyball-compile`` keeps its as-shipped
  ``torch.compile`` (max-autotune: minutes of compilation on a CPU, paid in the warm-up).
* ``pytorch_optimizer`` Muon (plain and ``ns_method="gram_newton_schulz"``), NorMuon and AdaMuon,
  each with a ``use_muon=True`` group.
* ``muonlab.Muon`` with its defaults (NorMuon, ``ns_method="auto"``, ``ns_dtype=None``: the dtype the
  machine measured, see ``muonlab.orthogonalize.dtype_choice``) and variants: plain Muon
  (``normuon=False``, the update the peers' plain Muon computes), plain
  Newton-Schulz, the per-matrix loop (``batched=False``), larger stacks (``batch_max_elements``),
  Polar Express coefficients, and an fp32 iteration (on the lab set only unless ``--all-variants``: 5x slower where bf16 is fast).

Peers' iteration dtype (``--peer-dtype``): ``shipped`` runs every peer as released (bf16, or
fp16 for pytorch-optimizer's Gram form); ``fp32`` patches the one cast that picks each peer's
iteration dtype (see :func:`fp32_iteration`; their code is otherwise unchanged), the comparison at
equal precision, and *estimates* torch.optim.Muon as shipped (:func:`torch_shipped_estimate`):
on a CPU without fast bf16 (one measured 1 GFLOP/s bf16 against 170 fp32) a bf16 step on GPT-2
shapes takes about 12 minutes (estimated: 724 s). ``auto`` (the default) picks ``fp32`` where muonlab's dtype probe
chose fp32 on the device, else ``shipped``.

Parameter sets (``--sizes``, comma-separated):

* ``lab`` / ``lab:NAME``: the Muon matrices of the lab GPT (``muonlab.lab.model``, default
  ``small``) as :func:`muonlab.muon_param_groups` routes them, with the *real* gradient of one
  forward/backward pass on a corpus batch.
* ``gpt2`` / ``gpt2:LAYERS``: GPT-2-small shapes, 12 layers (or LAYERS) of q, k, v, o (768x768),
  fc (3072x768) and proj (768x3072), with Gaussian gradients.

Timing: every contender gets ``--warmup`` steps, then ``--repeats`` rounds in which each
contender takes one step, in an order that rotates from round to round (so no one always runs
first, on a warm cache). The gradients are restored before every step (pytorch-optimizer's
Nesterov writes into ``p.grad``), outside the timed region. Parameters and gradients are shared by
all contenders (the values do not change the cost of a step); each keeps its own state. Reported:
median and min of the step times, and the median's ratio to torch.optim.Muon.

Polar error: how far each update direction is from the exact U Vᵀ of the gradient. On a fresh
optimizer the first step's momentum is a multiple of the gradient G for every implementation
(zero buffers; Nesterov or not), so the update is -lr·scale·msign(G) up to the orthogonalizer's
error. Parameters start at exactly zero (weight decay then changes nothing, and the parameter after
the step *is* the update Δ). For each matrix: error = min_α ‖α Δ − U Vᵀ‖_F / ‖U Vᵀ‖_F with U Vᵀ
from a float64 SVD of G, i.e. the distance of the direction, free of each library's learning-rate
scaling. Reported: mean and max over the set's matrices (for gpt2: one layer's six matrices). NorMuon
and AdaMuon rescale rows/entries after orthogonalizing by design, so their "error" measures that
choice, not an inaccuracy.

Matmul rate: the Newton-Schulz FLOPs of one step (5 quintic steps per matrix, or the Gram form's
count where a contender uses it; ``muonlab.orthogonalize.flops``) divided by the step time, as a
fraction of the machine's matmul rate in the contender's iteration dtype, measured in the same
process (the best of square matmuls of 512, 768 and 1024, one product or, on a multi-threaded CPU,
a batch of one per thread). Step time includes the momentum and
the parameter update, so this is a lower bound on the Newton-Schulz kernels' own rate; the
"Newton-Schulz alone" table times ``muonlab.orthogonalize`` by itself on each shape's stack.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from muonlab import Muon, orthogonalize

ortho = sys.modules["muonlab.orthogonalize"]  # the module (muonlab.orthogonalize is the function)

GPT2_D, GPT2_MLP, GPT2_LAYERS = 768, 3072, 12


# ---------------------------------------------------------------------- parameter sets
@dataclass
class ParamSet:
    name: str
    shapes: list[tuple[int, int]]
    grads: list[torch.Tensor]  # on the device, fp32
    error_index: list[int]  # matrices whose polar error is measured
    note: str


def gpt2_set(layers: int, device: torch.device, seed: int = 0) -> ParamSet:
    shapes: list[tuple[int, int]] = []
    for _ in range(layers):
        shapes += [(GPT2_D, GPT2_D)] * 4 + [(GPT2_MLP, GPT2_D), (GPT2_D, GPT2_MLP)]
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    return ParamSet(f"gpt2 ({layers} layers)", shapes, grads, list(range(6)),
                    f"GPT-2-small shapes: {layers} x (4 x 768x768, 3072x768, 768x3072), Gaussian gradients")


def lab_set(size: str, device: torch.device, seed: int = 0) -> ParamSet:
    from muonlab import muon_param_groups
    from muonlab.lab.data import load_corpus
    from muonlab.lab.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_name(size))
    corpus = load_corpus()
    x, y = corpus.get_batch("train", 8, model.config.seq_len, seed=seed, step=0)
    _, loss = model(x, y)
    loss.backward()
    mats = [p for g in muon_param_groups(model) if g["algorithm"] == "muon" for p in g["params"]]
    mats = [p for p in mats if p.ndim == 2 and p.grad is not None]
    shapes = [tuple(p.shape) for p in mats]
    grads = [p.grad.detach().float().clone().to(device) for p in mats]
    return ParamSet(f"lab {size}", shapes, grads, list(range(len(mats))),  # type: ignore[arg-type]
                    f"the lab GPT '{size}': {len(mats)} Muon matrices ({dict(Counter(shapes))}), "
                    "real gradients of one corpus batch")


def parse_sizes(text: str, device: torch.device) -> list[ParamSet]:
    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        kind, _, arg = item.partition(":")
        if kind == "lab":
            out.append(lab_set(arg or "small", device))
        elif kind == "gpt2":
            out.append(gpt2_set(int(arg) if arg else GPT2_LAYERS, device))
        else:
            raise SystemExit(f"bench_peers: error: unknown size {item!r}; use lab[:NAME] or gpt2[:LAYERS]")
    return out


# ---------------------------------------------------------------------- contenders
Build = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclass
class Contender:
    name: str
    build: Build
    dtype: torch.dtype  # the iteration dtype (for the matmul-rate reference)
    method: Callable[[int, int], tuple[str, tuple[int, ...]]]  # (m, n) -> (flop method, restarts)
    peer: bool = True
    note: str = ""
    ctx: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext  # entered around every step
    times: list[float] = field(default_factory=list)
    opt: Any = None


# ---------------------------------------------------------------------- peers at another iteration dtype
@contextlib.contextmanager
def _patched(pairs: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """Set ``module.attr = value`` for each (module, attr, value) inside the block, restoring after."""
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in pairs]
    try:
        for mod, attr, value in pairs:
            setattr(mod, attr, value)
        yield
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)


def _heavyball_round_fp32(ref: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    # heavyball.utils.stochastic_round_ with its one-argument form (round to bf16) kept in fp32; the
    # two-argument form (copy into ``ref``'s dtype) is unchanged
    return ref.float() if source is None else source.to(ref.dtype)


def fp32_iteration(peer: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A context factory under which the peer's Newton-Schulz iterates in fp32 instead of bf16/fp16.

    The peer's own code runs unchanged except for the one cast that picks the iteration dtype:
    torch.optim.Muon's ``_zeropower_via_newtonschulz`` becomes :func:`muonlab.reference.torch_ns_fp32`
    (the same function with a copying fp32 cast); pytorch-optimizer's two Newton-Schulz functions
    get ``dtype=torch.float32`` in every module that imported them; heavyball's bf16 stochastic
    rounding of the iteration's input becomes a no-op. Used where this machine has no fast bf16
    (``muonlab.orthogonalize.dtype_choice`` measured fp32 the faster): the comparison at equal precision.
    """
    if peer == "torch":
        from muonlab.reference import patched_torch_muon_fp32

        return patched_torch_muon_fp32
    if peer == "pytorch_optimizer":
        import functools
        import importlib

        import pytorch_optimizer.optimizer.utils.matrix as pom

        pairs = []
        for modname in ("base", "normuon", "adamuon", "adago"):
            try:
                mod = importlib.import_module(f"pytorch_optimizer.optimizer.muon.{modname}")
            except ImportError:
                continue
            for fn in ("zero_power_via_newton_schulz_5", "zero_power_via_gram_newton_schulz"):
                if hasattr(mod, fn):
                    pairs.append((mod, fn, functools.partial(getattr(pom, fn), dtype=torch.float32)))
        return lambda: _patched(pairs)
    if peer == "heavyball":
        import heavyball.utils as hbu

        return lambda: _patched([(hbu, "stochastic_round_", _heavyball_round_fp32)])
    raise ValueError(f"fp32_iteration: unknown peer {peer!r}")


def _ns(m: int, n: int) -> tuple[str, tuple[int, ...]]:
    return ("newton_schulz", ())


def contenders(device: torch.device, set_name: str, all_variants: bool, heavyball_compile: bool,
               peer_dtype: str = "shipped") -> tuple[list[Contender], list[str]]:
    """(available contenders, skipped peers with the reason). ``peer_dtype="fp32"``: every peer's
    iteration patched to fp32 (:func:`fp32_iteration`), else each runs as shipped."""
    out: list[Contender] = []
    skipped: list[str] = []
    lr = 0.02
    as_shipped = peer_dtype == "shipped"

    def peer_kw(peer: str, shipped: torch.dtype, note: str) -> dict[str, Any]:
        if as_shipped:
            return dict(dtype=shipped, note=note)
        return dict(dtype=torch.float32, ctx=fp32_iteration(peer),
                    note=note.replace("bf16", "fp32").replace("fp16", "fp32") + " (iteration patched to fp32)")
    if hasattr(torch.optim, "Muon"):
        out.append(Contender("torch.optim.Muon", lambda ps: torch.optim.Muon(ps, lr=lr, weight_decay=0.0),
                             method=_ns, **peer_kw("torch", torch.bfloat16, "Keller x5, bf16, per matrix")))
    else:
        skipped.append("torch.optim.Muon (needs torch >= 2.9)")
    try:
        import heavyball
        import heavyball.utils as hb_utils

        if not heavyball_compile:
            hb_utils.compile_mode = None
        out.append(Contender("heavyball.Muon", lambda ps: heavyball.Muon(ps, lr=lr), method=_ns,
                             **peer_kw("heavyball", torch.bfloat16, ("compiled (as shipped)" if heavyball_compile else "eager")
                                       + ", own 5-step schedule, bf16")))
    except ImportError as exc:
        skipped.append(f"heavyball ({exc.name} not installed: pip install 'muonlab[bench]')")
    try:
        import pytorch_optimizer as po

        def po_build(cls: Any, **kw: Any) -> Build:
            return lambda ps: cls([dict(params=ps, use_muon=True)], lr=lr, **kw)

        out.append(Contender("pytorch_optimizer.Muon", po_build(po.Muon), method=_ns,
                             **peer_kw("pytorch_optimizer", torch.bfloat16, "Keller x5, bf16")))
        out.append(Contender("pytorch_optimizer.Muon (gram)", po_build(po.Muon, ns_method="gram_newton_schulz"),
                             method=lambda m, n: ("gram", (2,)),
                             **peer_kw("pytorch_optimizer", torch.float16, "Gram Newton-Schulz in fp16, restart after step 2")))
        for cls_name in ("NorMuon", "AdaMuon"):
            cls = getattr(po, cls_name, None)
            if cls is None:
                skipped.append(f"pytorch_optimizer.{cls_name} (not in pytorch_optimizer {po.__version__})")
                continue
            out.append(Contender(f"pytorch_optimizer.{cls_name}", po_build(cls), method=_ns,
                                 **peer_kw("pytorch_optimizer", torch.bfloat16, "bf16, rescales the orthogonalized update by design")))
    except ImportError as exc:
        skipped.append(f"pytorch_optimizer ({exc.name} not installed: pip install 'muonlab[bench]')")

    chosen = ortho.default_dtype(device)

    def auto_method(dtype: torch.dtype) -> Callable[[int, int], tuple[str, tuple[int, ...]]]:
        def method(m: int, n: int) -> tuple[str, tuple[int, ...]]:
            name = ortho.choose_method(m, n, 5, dtype)
            return name, (ortho.gram_restarts(5, dtype) if name == "gram" else ())
        return method

    def ours(**kw: Any) -> Build:
        return lambda ps: Muon([dict(params=ps, algorithm="muon")], lr=lr, **kw)

    dname = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(chosen, str(chosen))
    out.append(Contender("muonlab.Muon (default)", ours(), chosen, auto_method(chosen), peer=False,
                         note=f"NorMuon, ns_method=auto, ns_dtype=None -> {dname} on this device"))
    out.append(Contender("muonlab.Muon normuon=False", ours(normuon=False), chosen, auto_method(chosen), peer=False,
                         note="plain Muon: the update of torch.optim.Muon and pytorch_optimizer.Muon"))
    out.append(Contender("muonlab.Muon ns_method=newton_schulz", ours(ns_method="newton_schulz"), chosen, _ns, peer=False))
    out.append(Contender("muonlab.Muon batched=False", ours(batched=False), chosen, auto_method(chosen), peer=False,
                         note="the per-matrix reference loop"))
    out.append(Contender("muonlab.Muon polar_express", ours(ns_coefficients="polar_express"), chosen,
                         auto_method(chosen), peer=False))
    for exp in (22, 24, 26):  # stack sizes around and above the CPU default (2**20 elements per thread)
        out.append(Contender(f"muonlab.Muon batch_max_elements=2**{exp}", ours(batch_max_elements=2**exp), chosen,
                             auto_method(chosen), peer=False, note="stacks of at most this many elements"))
    if chosen != torch.float32 and (all_variants or set_name.startswith("lab")):
        out.append(Contender("muonlab.Muon ns_dtype=fp32", ours(ns_dtype="fp32"), torch.float32,
                             auto_method(torch.float32), peer=False))
    return out, skipped


# ---------------------------------------------------------------------- measurements
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(cs: list[Contender], pset: ParamSet, device: torch.device, warmup: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter((0.02 * torch.randn(s, generator=gen)).to(device)) for s in pset.shapes]
    grads = [g.clone() for g in pset.grads]
    for p, g in zip(params, grads):
        p.grad = g

    def restore() -> None:
        # heavyball drops p.grad after its step: reattach as well as refill
        for p, g, master in zip(params, grads, pset.grads):
            g.copy_(master)
            p.grad = g

    for c in cs:
        c.opt = c.build(params)
        c.times = []
        for _ in range(warmup):
            restore()
            with c.ctx():
                c.opt.step()
        sync(device)
    for r in range(repeats):
        k = r % len(cs)
        for c in cs[k:] + cs[:k]:
            restore()
            with c.ctx():
                sync(device)
                t0 = time.perf_counter()
                c.opt.step()
                sync(device)
                c.times.append(time.perf_counter() - t0)
    for c in cs:
        c.opt = None
    del params, grads
    gc.collect()


def exact_polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double().cpu(), full_matrices=False)
    return U @ Vh


def direction_error(delta: torch.Tensor, polar: torch.Tensor) -> float:
    """min_α ‖α Δ − P‖_F / ‖P‖_F: the distance of Δ's direction from P = U Vᵀ."""
    d = delta.double().cpu()
    dd = float((d * d).sum())
    if dd == 0.0 or not math.isfinite(dd):
        return float("nan")
    alpha = float((d * polar).sum()) / dd
    return float((alpha * d - polar).norm() / polar.norm())


def polar_errors(cs: list[Contender], pset: ParamSet, device: torch.device) -> dict[str, list[float]]:
    idx = pset.error_index
    polars = [exact_polar(pset.grads[i]) for i in idx]
    out: dict[str, list[float]] = {}
    for c in cs:
        params = [torch.nn.Parameter(torch.zeros(pset.shapes[i], device=device)) for i in idx]
        for p, i in zip(params, idx):
            p.grad = pset.grads[i].clone()
        opt = c.build(params)
        with c.ctx():
            opt.step()
        out[c.name] = [direction_error(p.detach(), P) for p, P in zip(params, polars)]
        del opt, params
    return out


def matmul_rate(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """Best FLOP/s of square matmuls (512, 768, 1024) in ``dtype``: the machine's reference rate.

    Each size is timed as one product and, on a CPU with several threads, as a batch of one
    matrix per thread: some CPU kernels (oneDNN's bf16 ones, for instance) run a single product of
    this size on one thread, so a batch is what reaches the machine's rate.
    """
    best = 0.0
    gen = torch.Generator().manual_seed(2)
    batches = [1] if device.type != "cpu" or torch.get_num_threads() < 2 else [1, torch.get_num_threads()]
    for n in (512, 768, 1024):
        for b in batches:
            x, y = (torch.randn(b, n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
            torch.bmm(x, y)
            sync(device)
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.bmm(x, y)
                sync(device)
                best = max(best, 2.0 * b * n**3 / (time.perf_counter() - t0))
    return best


def torch_shipped_estimate(pset: ParamSet, device: torch.device, fp32_step_s: float, ns_steps: int = 5) -> dict[str, Any]:
    """torch.optim.Muon's as-shipped (bf16) step time, estimated where timing it would take too long.

    Estimate = its step with the iteration patched to fp32 (measured in the rounds) + for every
    matrix, ``ns_steps`` x (one bf16 iteration - one fp32 iteration) of torch's own function, each
    timed once per distinct shape (best of 2 in bf16, of 3 in fp32). Returns the estimate and the
    per-shape inputs, so the report can show how it was formed.
    """
    import torch.optim._muon as tm

    from muonlab.coefficients import KELLER as coeffs  # torch.optim.Muon's default quintic
    from muonlab.reference import torch_ns_fp32

    extra, inputs = 0.0, []
    for shape, count in Counter(pset.shapes).items():
        G = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(device)
        best = {}
        for label, fn, reps in (("bf16", tm._zeropower_via_newtonschulz, 2), ("fp32", torch_ns_fp32, 3)):
            fn(G, coeffs, 1, 1e-7)
            ts = []
            for _ in range(reps):
                sync(device)
                t0 = time.perf_counter()
                fn(G, coeffs, 1, 1e-7)
                sync(device)
                ts.append(time.perf_counter() - t0)
            best[label] = min(ts)
        extra += count * ns_steps * (best["bf16"] - best["fp32"])
        inputs.append(f"{count} x {shape[0]}x{shape[1]}: bf16 {1e3 * best['bf16']:.1f} ms vs fp32 {1e3 * best['fp32']:.2f} ms")
    return dict(ms=1e3 * (fp32_step_s + extra), inputs=inputs)


def step_ns_flops(c: Contender, shapes: list[tuple[int, int]]) -> float:
    total = 0.0
    for m, n in shapes:
        method, restarts = c.method(min(m, n), max(m, n))
        total += ortho.flops(method, m, n, 5, restarts)
    return total


def ns_alone(pset: ParamSet, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict[str, Any]]:
    """muonlab.orthogonalize by itself on each distinct shape's stack (the optimizer's default method)."""
    rows = []
    for shape, count in Counter(pset.shapes).items():
        m, n = min(shape), max(shape)
        X = torch.randn(count, *shape, generator=torch.Generator().manual_seed(3)).to(device)
        method = ortho.choose_method(m, n, 5, dtype)
        restarts = ortho.gram_restarts(5, dtype) if method == "gram" else ()
        fl = count * ortho.flops(method, m, n, 5, restarts)
        orthogonalize(X, "auto", dtype=dtype, nonfinite="propagate")
        sync(device)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            orthogonalize(X, "auto", dtype=dtype, nonfinite="propagate")
            sync(device)
            ts.append(time.perf_counter() - t0)
        med = statistics.median(ts)
        rows.append(dict(shape=f"{count}x{shape[0]}x{shape[1]}", method=method, ms=med * 1e3, gflops=fl / med / 1e9))
    return rows


# ---------------------------------------------------------------------- report
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def _md(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_set(pset: ParamSet, args: argparse.Namespace, device: torch.device, rates: dict[torch.dtype, float]) -> dict[str, Any]:
    cs, skipped = contenders(device, pset.name, args.all_variants, args.heavyball_compile, args.peer_dtype)
    if args.only:
        keep = [s.strip().lower() for s in args.only.split(",")]
        cs = [c for c in cs if c.name == "torch.optim.Muon" or any(k in c.name.lower() for k in keep)]
    print(f"\n== {pset.name}: {len(pset.shapes)} matrices; {len(cs)} contenders, {args.repeats} rounds", flush=True)
    t0 = time.perf_counter()
    time_steps(cs, pset, device, args.warmup, args.repeats)
    print(f"   timed in {time.perf_counter() - t0:.0f} s; polar errors ...", flush=True)
    errs = polar_errors(cs, pset, device)
    base = next((statistics.median(c.times) for c in cs if c.name == "torch.optim.Muon"), None)
    shipped = None  # torch.optim.Muon as shipped, when the timed one ran patched to fp32
    if base is not None and args.peer_dtype == "fp32":
        print("   estimating torch.optim.Muon as shipped (bf16) ...", flush=True)
        shipped = torch_shipped_estimate(pset, device, base)
    results = []
    for c in cs:
        for dt in (c.dtype,):
            if dt not in rates:
                rates[dt] = matmul_rate(dt, device)
        med = statistics.median(c.times)
        fl = step_ns_flops(c, pset.shapes)
        e = errs[c.name]
        results.append(dict(
            name=c.name, peer=c.peer, note=c.note, dtype=str(c.dtype).replace("torch.", ""),
            median_ms=med * 1e3, min_ms=min(c.times) * 1e3, times_ms=[t * 1e3 for t in c.times],
            speedup_vs_torch=(base / med) if base else None,
            speedup_vs_torch_shipped=(shipped["ms"] / 1e3 / med) if shipped else None,
            polar_error_mean=statistics.fmean(e), polar_error_max=max(e),
            ns_gflops=fl / med / 1e9, matmul_peak_gflops=rates[c.dtype] / 1e9,
            ns_rate_fraction=(fl / med) / rates[c.dtype],
        ))
    if ortho.default_dtype(device) not in rates:
        rates[ortho.default_dtype(device)] = matmul_rate(ortho.default_dtype(device), device)
    alone = ns_alone(pset, device, ortho.default_dtype(device), max(3, args.repeats))
    for row in alone:
        row["fraction"] = row["gflops"] * 1e9 / rates[ortho.default_dtype(device)]
    return dict(set=pset.name, note=pset.note, matrices=len(pset.shapes), skipped=skipped, torch_shipped_estimate=shipped,
                error_matrices=len(pset.error_index), results=results, ns_alone=alone)


def to_markdown(report: dict[str, Any]) -> str:
    out = [f"# Muon implementations side by side ({report['device']})", "",
           f"Machine: {report['machine']}; torch {report['torch']}; muonlab iteration dtype here: "
           f"{report['dtype_choice']}; peers' iteration: "
           + ("as shipped" if report.get("peer_dtype", "shipped") == "shipped" else "patched to fp32 (equal precision)") + ".",
           f"Command: `{report['command']}`", ""]
    for s in report["sets"]:
        out += [f"## {s['set']}", "", s["note"] + ".", ""]
        est = s.get("torch_shipped_estimate")
        rows = []
        for r in sorted(s["results"], key=lambda r: r["median_ms"]):
            sp = f"{r['speedup_vs_torch']:.2f}x" if r["speedup_vs_torch"] else "-"
            row = [r["name"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", sp]
            if est:
                row.append(f"{r['speedup_vs_torch_shipped']:.1f}x")
            rows.append(row + [f"{r['polar_error_mean']:.4f} / {r['polar_error_max']:.4f}", r["dtype"],
                               f"{r['ns_gflops']:.0f} ({100 * r['ns_rate_fraction']:.0f}%)", r["note"]])
        out.append(_md(["implementation", "step ms (median)", "min",
                        "speed-up vs torch" + (" (fp32, same dtype)" if est else "")]
                       + (["vs torch as shipped (bf16, est.)"] if est else [])
                       + ["polar error mean / max", "NS dtype", "NS GFLOP/s (% of matmul peak)", "note"], rows))
        if est:
            out += ["", f"torch.optim.Muon as shipped (bf16 iteration), estimated: {est['ms']:.0f} ms per step = its "
                    "fp32-patched step + 5 x (one bf16 iteration - one fp32 iteration) of its own function per matrix; "
                    "per shape: " + "; ".join(est["inputs"]) + "."]
        out += ["", "Newton-Schulz alone (`muonlab.orthogonalize`, default method and dtype, one stack per shape):", ""]
        out.append(_md(["stack", "method", "ms", "GFLOP/s", "% of matmul peak"],
                       [[a["shape"], a["method"], f"{a['ms']:.1f}", f"{a['gflops']:.0f}", f"{100 * a['fraction']:.0f}%"]
                        for a in s["ns_alone"]]))
        if s["skipped"]:
            out += ["", "Skipped: " + "; ".join(s["skipped"]) + "."]
        out.append("")
    out += ["Matmul peak measured here: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["matmul_peak_gflops"].items()) + ".",
            "", "Polar error: distance of the first update's direction from the exact U Vᵀ of the gradient "
            "(see the docstring of benchmarks/bench_peers.py). Timings from one shared machine: compare ratios within a run."]
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="comma list of lab[:NAME] and gpt2[:LAYERS] (default: lab,gpt2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per contender first (default 1)")
    ap.add_argument("--quick", action="store_true", help="under a minute on 2 cores: lab,gpt2:2 and 2 rounds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--only", default=None, help="comma list of name fragments to keep (torch.optim.Muon always kept)")
    ap.add_argument("--all-variants", action="store_true", help="also the fp32 muonlab variant on large sets")
    ap.add_argument("--heavyball-compile", action="store_true", help="heavyball as shipped (torch.compile)")
    ap.add_argument("--peer-dtype", choices=("auto", "shipped", "fp32"), default="auto",
                    help="peers' iteration dtype: as shipped (bf16/fp16), or patched to fp32 (equal precision, "
                         "torch.optim.Muon as shipped then estimated); auto: fp32 where muonlab's probe found bf16 "
                         "slow on this device, else shipped")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.sizes is None:
        args.sizes = "lab,gpt2:2" if args.quick else "lab,gpt2"
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("bench_peers: error: --repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_peers: error: --device cuda but torch.cuda.is_available() is False")
    warnings.filterwarnings("ignore", category=UserWarning)
    choice = ortho.dtype_choice(device)
    if args.peer_dtype == "auto":
        args.peer_dtype = "fp32" if choice.dtype == torch.float32 else "shipped"
    rates: dict[torch.dtype, float] = {}
    t0 = time.perf_counter()
    sets = [run_set(p, args, device, rates) for p in parse_sizes(args.sizes, device)]
    report = dict(device=str(device), machine=machine(device), torch=torch.__version__,
                  dtype_choice=f"{str(choice.dtype).replace('torch.', '')} ({choice.reason})", peer_dtype=args.peer_dtype,
                  command="python benchmarks/bench_peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  matmul_peak_gflops={str(k).replace("torch.", ""): v / 1e9 for k, v in rates.items()},
                  seconds=time.perf_counter() - t0, sets=sets)
    md = to_markdown(report)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".md").write_text(md)
        Path(args.out + ".json").write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}.md and {args.out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
