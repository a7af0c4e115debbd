#!/usr/bin/env bash
# Idempotent set-up of ./.venv for muonlab.
#   bash scripts/setup.sh         library + lab (matplotlib, pytorch-optimizer)
#   bash scripts/setup.sh --dev   also the test tools and Debian's chromium for the HTML report test
# torch is installed first, pinned to 2.13.0: on a CPU machine whose pip finds the local CPU wheel,
# this never pulls the multi-GB CUDA wheels; muonlab's own `torch>=2.6` is then already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="lab"
if [[ "${1:-}" == "--dev" ]]; then extra="dev"; fi
PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==${MUONLAB_TORCH_VERSION:-2.13.0}"
  .venv/bin/pip install -q "torch==${MUONLAB_TORCH_VERSION:-2.13.0}"
fi
echo "[setup] installing muonlab[$extra]"
.venv/bin/pip install -q -e ".[$extra]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import muonlab, torch; print(f'[setup] muonlab {muonlab.__version__}, torch {torch.__version__}')"
if [[ "$extra" == "dev" ]] && ! command -v chromium >/dev/null 2>&1; then
  if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium for the HTML report test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[setup] WARNING: could not install chromium; the HTML report test will fail" >&2
  else
    echo "[setup] WARNING: chromium not found and cannot apt-get install it; the HTML report test will fail" >&2
  fi
fi
