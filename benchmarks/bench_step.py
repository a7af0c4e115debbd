"""Optimizer step time on GPT-shaped parameter sets: muonlab.Muon vs torch.optim.Muon + AdamW vs AdamW.

Not a test. The parameters are built directly (no model): random weights and fixed random
gradients with the shapes of a GPT, so only ``optimizer.step()`` is timed.

Parameter sets (``--sizes``):

* ``small``: d_model 256, 4 layers, per layer wq/wk/wv/wo (256x256), MLP fc (1024x256) and
  proj (256x1024), LayerNorm weights/biases; byte-level vocabulary of 256 (token and position
  embeddings 256x256) and an untied 256x256 head.
* ``gpt2``: GPT-2 small, 12 layers, d_model 768, MLP 3072, token embedding 50304x768 (tied to the
  head), position embedding 1024x768 (q, k, v as three 768x768 matrices instead of one fused
  2304x768 c_attn, so that Muon orthogonalizes them separately).

Hidden matrices go to Muon and everything else (embeddings, head, norms) to AdamW, in every
variant:

* ``muonlab.Muon`` (batched, defaults): same-shape matrices stacked into one orthogonalization,
  fp32 on CPU, ``ns_method="auto"`` (the Gram form of the same polynomial where it needs fewer
  FLOPs, e.g. the 3072x768 MLP matrices);
* ``muonlab.Muon ns_method="newton_schulz"``: the same, plain Newton-Schulz on every matrix;
* ``muonlab.Muon batched=False``: the per-matrix reference loop;
* ``torch.optim.Muon + AdamW (bf16 NS)``: torch's Muon as shipped, which always iterates in
  bf16 (very slow matmuls on CPUs without bf16 units). When a measured step would take longer than
  ``--bf16-max-s`` the step time is *estimated*: the fp32-patched step time plus, for every
  matrix, 5 x (one bf16 iteration - one fp32 iteration) timed on its shape. Estimated rows are
  marked "est.";
* ``torch.optim.Muon + AdamW (fp32 NS)``: torch's Newton-Schulz patched to iterate in fp32 (the same
  algorithm, only the cast changed), for an equal-precision comparison;
* ``torch.optim.AdamW``: on every parameter.

Also reported: the orthogonalization error of each Muon variant against the exact polar factor
(SVD) on one representative gradient (a Gaussian 1024x256 matrix, the small GPT's MLP shape), and
the optimizer-state bytes against AdamW's.

Usage::

    python benchmarks/bench_step.py                         # small and gpt2, a few minutes on 2 cores
    python benchmarks/bench_step.py --sizes small --repeats 10 --out bench.md
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter

import torch
import torch.optim._muon as torch_muon

import muonlab
from muonlab import Muon
from muonlab.reference import patched_torch_muon_fp32 as torch_ns_fp32  # context manager
from muonlab.reference import torch_ns_fp32 as ns_fp32  # torch's NS with an fp32 cast

KELLER = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


# ---------------------------------------------------------------------- parameter sets
def gpt_shapes(vocab: int, d: int, layers: int, mlp: int, block: int, tied_head: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, algorithm) of a GPT's parameters; hidden matrices -> muon, the rest -> adamw."""
    out = [("wte", (vocab, d), "adamw"), ("wpe", (block, d), "adamw")]
    for i in range(layers):
        p = f"h.{i}."
        out += [(p + "ln1.weight", (d,), "adamw"), (p + "ln1.bias", (d,), "adamw")]
        out += [(p + f"attn.{m}", (d, d), "muon") for m in ("wq", "wk", "wv", "wo")]
        out += [(p + "ln2.weight", (d,), "adamw"), (p + "ln2.bias", (d,), "adamw")]
        out += [(p + "mlp.fc", (mlp, d), "muon"), (p + "mlp.proj", (d, mlp), "muon")]
    out += [("ln_f.weight", (d,), "adamw"), ("ln_f.bias", (d,), "adamw")]
    if not tied_head:
        out.append(("lm_head", (vocab, d), "adamw"))
    return out


SIZES = {
    "small": dict(vocab=256, d=256, layers=4, mlp=1024, block=256, tied_head=False),
    "gpt2": dict(vocab=50304, d=768, layers=12, mlp=3072, block=1024, tied_head=True),
}


def make_params(spec: list[tuple[str, tuple[int, ...], str]], seed: int = 0) -> dict[str, tuple[torch.nn.Parameter, str]]:
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape, alg in spec:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen)
        params[name] = (p, alg)
    return params




# ---------------------------------------------------------------------- variants
def state_bytes(*opts: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for o in opts for st in o.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def build(variant: str, params: dict[str, tuple[torch.nn.Parameter, str]]) -> list[torch.optim.Optimizer]:
    muon = [(n, p) for n, (p, a) in params.items() if a == "muon"]
    rest = [(n, p) for n, (p, a) in params.items() if a == "adamw"]
    if variant in ("muonlab", "muonlab_ns", "muonlab_loop"):
        groups = [{"params": muon, "algorithm": "muon"}, {"params": rest, "algorithm": "adamw"}]
        return [Muon(groups, lr=0.02, momentum=0.95, adamw_lr=3e-4, batched=variant != "muonlab_loop",
                     ns_method="newton_schulz" if variant == "muonlab_ns" else "auto")]
    if variant in ("torch_bf16", "torch_fp32"):
        return [torch.optim.Muon([p for _, p in muon], lr=0.02, momentum=0.95, weight_decay=0.0),
                torch.optim.AdamW([p for _, p in rest], lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)]
    if variant == "adamw":
        return [torch.optim.AdamW([p for p, _ in params.values()], lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)]
    raise ValueError(variant)


LABELS = {
    "muonlab": "muonlab.Muon (defaults: batched, fp32, auto)",
    "muonlab_ns": "muonlab.Muon ns_method='newton_schulz'",
    "muonlab_loop": "muonlab.Muon batched=False",
    "torch_bf16": "torch.optim.Muon + AdamW (bf16 NS, as shipped)",
    "torch_fp32": "torch.optim.Muon + AdamW (NS patched to fp32)",
    "adamw": "torch.optim.AdamW (all params)",
}


def run_interleaved(variants: list[str], params, warmup: int, repeats: int) -> dict[str, dict]:
    """Time the variants round-robin (one step of each per round), so that background load on a
    shared machine hits every variant alike. Per variant: median wall time and median CPU time
    (``time.process_time``: with one thread, the step's cost without the time spent waiting for a
    busy CPU)."""
    opts = {v: build(v, params) for v in variants}
    ctx = {v: (torch_ns_fp32 if v == "torch_fp32" else contextlib.nullcontext) for v in variants}

    def step(v: str) -> tuple[float, float]:
        with ctx[v]():
            w0, c0 = time.perf_counter(), time.process_time()
            for o in opts[v]:
                o.step()
            return time.perf_counter() - w0, time.process_time() - c0

    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for v in variants:
        for _ in range(max(warmup, 0 if repeats else 1)):  # repeats=0: one step so that state exists
            step(v)
    for _ in range(repeats):
        for v in variants:
            times[v].append(step(v))
    results = {}
    for v in variants:
        wall = [w for w, _ in times[v]]
        cpu = [c for _, c in times[v]]
        results[v] = {"wall": 1e3 * statistics.median(wall) if wall else math.nan,
                      "cpu": 1e3 * statistics.median(cpu) if cpu else math.nan,
                      "n": len(wall), "bytes": state_bytes(*opts[v]), "estimated": False}
    opts.clear()
    gc.collect()
    return results


def time_one_ns_iteration(shape: tuple[int, int], fn, repeats: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds for ONE Newton-Schulz iteration of torch's function ``fn`` on this shape."""
    G = torch.randn(shape)
    fn(G, KELLER, 1, 1e-7)  # first-call overhead
    wall = cpu = math.inf
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn(G, KELLER, 1, 1e-7)
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def estimate_bf16(params, fp32: dict) -> tuple[dict, dict]:
    """torch bf16 step ≈ fp32-patched step + Σ matrices · NS_STEPS · (bf16 iteration − fp32 iteration)."""
    counts = Counter(tuple(p.shape) for p, a in params.values() if a == "muon")
    extra = {"wall": 0.0, "cpu": 0.0}
    detail = {}
    for shape, k in counts.items():
        t16 = time_one_ns_iteration(shape, torch_muon._zeropower_via_newtonschulz)
        t32 = time_one_ns_iteration(shape, ns_fp32, repeats=2)
        detail[shape] = (k, t16, t32)
        for i, key in enumerate(("wall", "cpu")):
            extra[key] += k * NS_STEPS * max(t16[i] - t32[i], 0.0)
    est = {key: fp32[key] + 1e3 * extra[key] for key in ("wall", "cpu")}
    return est, detail


# ---------------------------------------------------------------------- orthogonalization error
def ortho_errors(shape: tuple[int, int] = (1024, 256), seed: int = 1) -> list[list]:
    """Each variant's orthogonalized update vs the SVD polar factor on one Gaussian gradient."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    ref = U @ Vh

    def via_muonlab(batched: bool, method: str = "auto") -> torch.Tensor:
        # one real optimizer step: momentum 0, lr 1, no shape factor -> the update is -O
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = G.clone()
        opt = Muon([{"params": [("g", p)], "algorithm": "muon"}], lr=1.0, momentum=0.0, nesterov=False,
                   adjust_lr_fn="none", batched=batched, ns_method=method)
        opt.step()
        return -p.detach()

    outs = {
        "muonlab": via_muonlab(True),
        "muonlab_ns": via_muonlab(True, "newton_schulz"),
        "muonlab_loop": via_muonlab(False),
        "torch_bf16": torch_muon._zeropower_via_newtonschulz(G, KELLER, NS_STEPS, 1e-7).float(),
        "torch_fp32": ns_fp32(G, KELLER, NS_STEPS, 1e-7),
        "svd (muonlab ns_method='svd')": muonlab.orthogonalize(G, method="svd"),
    }
    rows = []
    for name, O in outs.items():
        s = torch.linalg.svdvals(O.double())
        rel = float((O.double() - ref).norm() / ref.norm())
        rows.append([LABELS.get(name, name), f"{rel:.4f}", f"{float(s.min()):.4f}", f"{float(s.max()):.4f}"])
    return rows


# ---------------------------------------------------------------------- output
def md_table(headers: list[str], rows: list[list]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, load average {load}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="small,gpt2", help="comma-separated: small, gpt2 (default: both)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per variant for 'small' (median reported)")
    ap.add_argument("--gpt2-repeats", type=int, default=1, help="timed steps per variant for 'gpt2' (default 1)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before timing ('small'; gpt2 uses 0)")
    ap.add_argument("--bf16-max-s", type=float, default=40.0,
                    help="measure torch's bf16 Muon only if its estimated step is below this many seconds")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's default, one per core); 1 is steadier on a busy machine")
    ap.add_argument("--out", default=None, help="also write the report (Markdown) to this file")
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; valid: {sorted(SIZES)}")

    if args.threads:
        torch.set_num_threads(args.threads)
    # CPU time is the steadier measure on a shared machine, but with several threads it also counts
    # their spin-waiting; then the ratios use wall time.
    metric = "cpu" if torch.get_num_threads() == 1 else "wall"
    torch.manual_seed(0)
    t_start = time.time()
    lines = ["# Optimizer step benchmark", "", f"Machine: {machine()}", "",
             f"Command: `python {' '.join(['benchmarks/bench_step.py'] + (argv if argv is not None else sys.argv[1:]))}`", ""]
    print("\n".join(lines), flush=True)

    for size in sizes:
        cfg = SIZES[size]
        spec = gpt_shapes(**cfg)
        params = make_params(spec)
        n_muon = sum(1 for *_, a in spec if a == "muon")
        numel = {a: sum(math.prod(s) for _, s, b in spec if b == a) for a in ("muon", "adamw")}
        warmup, repeats = (args.warmup, args.repeats) if size == "small" else (0, args.gpt2_repeats)
        variants = ["adamw", "muonlab", "muonlab_ns", "muonlab_loop", "torch_fp32"]
        print(f"[{size}] timing {', '.join(LABELS[v] for v in variants)} ({warmup} warm-up, {repeats} rounds) ...", flush=True)
        results = run_interleaved(variants, params, warmup, repeats)
        est, detail = estimate_bf16(params, results["torch_fp32"])
        if est["wall"] / 1e3 <= args.bf16_max_s:
            print(f"[{size}] {LABELS['torch_bf16']} (estimated {est['wall'] / 1e3:.1f} s/step, measuring) ...", flush=True)
            results["torch_bf16"] = run_interleaved(["torch_bf16"], params, 0, max(1, min(repeats, 2)))["torch_bf16"]
        else:
            print(f"[{size}] {LABELS['torch_bf16']}: estimated {est['wall'] / 1e3:.0f} s/step, not run", flush=True)
            # its state layout is that of the fp32-patched run
            results["torch_bf16"] = {**est, "n": 0, "bytes": results["torch_fp32"]["bytes"], "estimated": True}

        key = metric
        base, ours, adam_bytes = results["adamw"][key], results["muonlab"][key], results["adamw"]["bytes"]
        rows = []
        for variant in ("muonlab", "muonlab_ns", "muonlab_loop", "torch_fp32", "torch_bf16", "adamw"):
            r = results[variant]
            mark = " (est.)" if r["estimated"] else ""
            rows.append([LABELS[variant], f"{r['cpu']:.1f}{mark}", f"{r['wall']:.1f}{mark}",
                         "-" if r["estimated"] else str(r["n"]),
                         f"{r[key] / base:.1f}x", f"{r[key] / ours:.2f}x",
                         f"{r['bytes'] / 2**20:.1f}", f"{r['bytes'] / adam_bytes:.2f}"])
        block = [
            f"## {size}: {len(spec)} tensors, {n_muon} Muon matrices ({numel['muon'] / 1e6:.2f} M elements), "
            f"AdamW part {numel['adamw'] / 1e6:.2f} M elements",
            "",
            f"Median of {repeats} timed steps per variant after {warmup} warm-up steps, variants interleaved "
            f"round-robin; ratios use {'CPU' if key == 'cpu' else 'wall'} time. torch's bf16 Muon is run on its own "
            f"when its estimated step is under {args.bf16_max_s:g} s, else estimated (est.).",
            "",
            md_table(["variant", "CPU ms/step", "wall ms/step", "steps timed", "vs AdamW", "vs muonlab default",
                      "state MiB", "state / AdamW"], rows),
            "",
            "bf16 estimate inputs (CPU time of one NS iteration of torch's function, per shape): "
            + "; ".join(f"{k} x {s[0]}x{s[1]}: bf16 {1e3 * t16[1]:.0f} ms vs fp32 {1e3 * t32[1]:.1f} ms"
                        for s, (k, t16, t32) in detail.items())
            + f"; estimated bf16 step: {est['cpu']:.0f} ms CPU.",
            "",
        ]
        print("\n".join(block), flush=True)
        lines += block
        del params
        gc.collect()

    print("[orthogonalization error] ...", flush=True)
    block = [
        "## Orthogonalization error on one gradient (Gaussian 1024x256, 5 Keller steps)",
        "",
        "Relative Frobenius distance to the exact polar factor U Vᵀ (float64 SVD), and the range of the "
        "singular values of the orthogonalized matrix (exact: all 1). Keller's coefficients deliberately "
        "stop short of convergence (singular values ~0.7-1.2).",
        "",
        md_table(["variant", "‖O − UVᵀ‖_F / ‖UVᵀ‖_F", "σ_min", "σ_max"], ortho_errors()),
        "",
        f"Total benchmark wall time: {time.time() - t_start:.0f} s; load average at the end: "
        + (", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"),
        "",
    ]
    print("\n".join(block), flush=True)
    lines += block
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
