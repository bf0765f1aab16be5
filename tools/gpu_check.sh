#!/usr/bin/env bash
# One command for a GPU machine: build moe._C (with its CUDA kernels), run the GPU kernel
# tests, then the GPU benchmarks.
#
#   bash tools/gpu_check.sh            # build + tests/gpu + quick GPU benchmark
#   BENCH_ARGS="--T 4096 16384 --d 256 1024 --E 8 64 --k 1 2 8" bash tools/gpu_check.sh   # full grid
#   SKIP_BUILD=1 bash tools/gpu_check.sh                                                     # reuse the build
#
# Exits non-zero when the build or a test fails. Without a GPU the tests skip and the
# benchmark is not run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi

if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
  echo "== build: pip install --no-build-isolation -e ."
  "$PY" -m pip install --no-build-isolation -e . 2>&1 | grep -E "moe._C|Successfully|error|Error" || true
fi
"$PY" - <<'PYEOF'
import torch
from moe.ops import registry
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); GPU: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for name in ("cuda", "triton"):
    print(f"  backend {name}: {registry._BACKENDS[name].unavailable_reason('cuda') or 'available'}")
PYEOF

echo "== tests/gpu"
"$PY" -m pytest -q tests/gpu

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== GPU benchmark"
  # shellcheck disable=SC2086
  "$PY" tools/bench_kernels.py --device cuda ${BENCH_ARGS:---quick --repeats 20 --warmup 5}
else
  echo "== no GPU: benchmark skipped"
fi
