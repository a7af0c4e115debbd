#!/usr/bin/env bash
# GPU kit: correctness tests and benchmarks on a CUDA machine; writes docs/gpu.md.
#
#   bash benchmarks/gpu_suite.sh            # from the repository root, a few minutes on one GPU
#   bash benchmarks/gpu_suite.sh --quick    # shorter benchmarks (bench_peers --quick, fewer repeats)
#
# Steps (each one runs even if an earlier one failed; the exit status is 1 if any failed):
#   1. setup check: python, torch with CUDA, the GPU's name and capability, muonlab importable
#      (installed, or from ./src), the benchmark peers (optional: heavyball, pytorch-optimizer);
#   2. tests: pytest -m "not slow" tests/test_cuda.py tests/test_orthogonalize.py tests/test_dtype_probe.py
#      (test_cuda.py is the GPU file: every method in bf16 against float64, the optimizer step on
#      CUDA against the CPU, torch.compile and CUDA-graph capture of orthogonalize);
#   3. Newton-Schulz bf16 throughput against the GPU's measured bf16 matmul peak;
#   4. benchmarks/bench_peers.py --device cuda (every Muon implementation, one step, side by side);
#   5. docs/gpu.md: the device, the test summary and both tables (raw logs in $RESULTS).
#
# Environment: PYTHON (default .venv/bin/python if present, else python3), RESULTS (default
# benchmarks/gpu_results), DOC (default docs/gpu.md), CUDA_VISIBLE_DEVICES as usual.
# Nothing is downloaded: a peer that is not installed is reported as skipped by bench_peers.

set -uo pipefail

QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_suite: error: unknown argument $arg (use --quick)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RESULTS="${RESULTS:-benchmarks/gpu_results}"
DOC="${DOC:-docs/gpu.md}"
mkdir -p "$RESULTS" "$(dirname "$DOC")"
FAILED=()
TO=""
if command -v timeout >/dev/null 2>&1; then TO="timeout"; fi

run() {  # run NAME SECONDS CMD...: log to $RESULTS/NAME.log, record a failure, never abort
  local name="$1" secs="$2"; shift 2
  echo "== $name: $*"
  local status
  if [[ -n "$TO" ]]; then "$TO" "$secs" "$@" >"$RESULTS/$name.log" 2>&1; status=$?
  else "$@" >"$RESULTS/$name.log" 2>&1; status=$?; fi
  tail -n 25 "$RESULTS/$name.log"
  if [[ $status -ne 0 ]]; then
    echo "!! $name failed with status $status (log: $RESULTS/$name.log)"
    FAILED+=("$name (status $status)")
  fi
  return 0
}

# ---------------------------------------------------------------- 1. setup check
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"  # a checkout works without installing
run setup 120 "$PYTHON" - <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}; CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch (torch.cuda.is_available() is False): nothing to do on this machine")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {torch.cuda.get_device_name(i)}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
import muonlab
from muonlab.orthogonalize import dtype_choice
print(f"muonlab from {muonlab.__file__}; default iteration dtype on cuda: {dtype_choice('cuda')}")
for peer in ("heavyball", "pytorch_optimizer"):
    try:
        mod = importlib.import_module(peer)
        print(f"peer {peer} {getattr(mod, '__version__', '')}: available")
    except ImportError:
        print(f"peer {peer}: not installed (bench_peers will list it as skipped; pip install 'muonlab[bench]')")
x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize(); print("bf16 matmul on the GPU:", tuple((x @ x).shape), "ok")
EOF
if [[ " ${FAILED[*]-} " == *" setup "* ]]; then
  echo "gpu_suite: setup failed; see $RESULTS/setup.log" >&2
  exit 1
fi

# ---------------------------------------------------------------- 2. tests
run tests 1800 "$PYTHON" -m pytest -m "not slow" -q -rs -p no:cacheprovider \
  tests/test_cuda.py tests/test_orthogonalize.py tests/test_dtype_probe.py

# ---------------------------------------------------------------- 3. NS throughput vs bf16 peak
REPEATS=10; [[ $QUICK -eq 1 ]] && REPEATS=3
run ns_throughput 900 "$PYTHON" - "$REPEATS" "$RESULTS/ns_throughput.json" <<'EOF'
import json, sys, time
import torch
from muonlab import orthogonalize
from muonlab.orthogonalize import choose_method, flops, gram_restarts
repeats, out = int(sys.argv[1]), sys.argv[2]
dev = torch.device("cuda")

def timed(fn):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best, times = float("inf"), []
    for _ in range(repeats):
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]

peak = 0.0
for n in (2048, 4096, 8192):
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16); b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    peak = max(peak, 2 * n**3 / timed(lambda: a @ b))
rows = []
for count, m, n in ((48, 768, 768), (24, 768, 3072), (24, 3072, 768), (8, 2048, 2048), (4, 2048, 8192), (1, 8192, 8192)):
    G = torch.randn(count, m, n, device=dev)
    for method in ("newton_schulz", "auto"):
        for compile in (False, True):
            used = choose_method(m, n, 5, torch.bfloat16) if method == "auto" else method
            fl = count * flops(used, m, n, 5, gram_restarts(5, torch.bfloat16) if used == "gram" else ())
            try:
                t = timed(lambda: orthogonalize(G, method, dtype="bf16", nonfinite="propagate", compile=compile))
            except Exception as exc:  # a compile failure is a result too
                rows.append(dict(stack=f"{count}x{m}x{n}", method=method, used=used, compile=compile, error=repr(exc)[:200]))
                continue
            rows.append(dict(stack=f"{count}x{m}x{n}", method=method, used=used, compile=compile, ms=t * 1e3,
                             tflops=fl / t / 1e12, fraction=fl / t / peak))
    del G
    torch.cuda.empty_cache()
res = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, bf16_peak_tflops=peak / 1e12, rows=rows)
json.dump(res, open(out, "w"), indent=1)
print(f"{res['device']}: measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
for r in rows:
    if "error" in r:
        print(f"{r['stack']:>14} {r['method']:>13} compile={r['compile']!s:5} ERROR {r['error']}")
    else:
        print(f"{r['stack']:>14} {r['method']:>13} ({r['used']}) compile={r['compile']!s:5} {r['ms']:8.2f} ms "
              f"{r['tflops']:7.1f} TFLOP/s {100 * r['fraction']:5.1f}% of peak")
EOF

# ---------------------------------------------------------------- 4. peers side by side
PEER_ARGS=(--device cuda --out "$RESULTS/peers")
[[ $QUICK -eq 1 ]] && PEER_ARGS+=(--quick) || PEER_ARGS+=(--repeats 10 --warmup 2)
run bench_peers 1800 "$PYTHON" benchmarks/bench_peers.py "${PEER_ARGS[@]}"

# ---------------------------------------------------------------- 5. docs/gpu.md
run write_doc 120 "$PYTHON" - "$RESULTS" "$DOC" "${FAILED[*]-}" <<'EOF'
import datetime, json, re, sys
from pathlib import Path
import torch
results, doc, failed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dev = torch.cuda.get_device_name(0)
cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
lines = [f"# GPU results: {dev}", "",
         f"Measured by `bash benchmarks/gpu_suite.sh` on {datetime.date.today()}: {dev} (compute capability {cap}), "
         f"torch {torch.__version__}, CUDA {torch.version.cuda}. Raw logs and JSON: `{results}/`.", ""]
tests = (results / "tests.log").read_text() if (results / "tests.log").exists() else ""
summary = [l for l in tests.splitlines() if re.search(r"\b(passed|failed|error)", l)]
lines += ["## Tests", "", "`pytest -m \"not slow\" tests/test_cuda.py tests/test_orthogonalize.py tests/test_dtype_probe.py`: "
          + (summary[-1].strip("= ") if summary else "no summary (see tests.log)"), ""]
if failed.strip():
    lines += [f"Steps that failed: {failed}.", ""]
ns = results / "ns_throughput.json"
if ns.exists():
    d = json.loads(ns.read_text())
    lines += ["## Newton-Schulz (Keller x5, bf16) against the measured bf16 matmul peak", "",
              f"Measured bf16 matmul peak: {d['bf16_peak_tflops']:.0f} TFLOP/s (best of square 2048/4096/8192).", "",
              "| stack | method (runs) | compile | ms | TFLOP/s | % of peak |", "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if "error" in r:
            lines.append(f"| {r['stack']} | {r['method']} ({r['used']}) | {r['compile']} | error: {r['error']} | | |")
        else:
            lines.append(f"| {r['stack']} | {r['method']} ({r['used']}) | {r['compile']} | {r['ms']:.2f} | {r['tflops']:.1f} | {100 * r['fraction']:.0f}% |")
    lines.append("")
peers = results / "peers.md"
if peers.exists():
    body = peers.read_text().split("\n", 1)[1]  # drop its title
    lines += ["## Muon implementations side by side (one optimizer step)", "", body.replace("\n## ", "\n### ")]
doc.write_text("\n".join(lines) + "\n")
print(f"wrote {doc}")
EOF

echo
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "gpu_suite: failed steps: ${FAILED[*]}"
  exit 1
fi
echo "gpu_suite: all steps passed; results in $DOC and $RESULTS/"
