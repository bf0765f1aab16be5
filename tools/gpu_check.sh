#!/usr/bin/env bash
# One command for a GPU machine: build moe._C (with its CUDA kernels), run the GPU kernel
# tests, then the GPU benchmarks and a short bf16 training (tokens/s and MFU).
#
#   bash tools/gpu_check.sh            # build + tests/gpu + quick GPU benchmark
#   BENCH_ARGS="--T 4096 16384 --d 256 1024 --E 8 64 --k 1 2 8" bash tools/gpu_check.sh   # full grid
#   SKIP_BUILD=1 bash tools/gpu_check.sh                                                     # reuse the build
#   TRAIN_ARGS="--set train.steps=300" bash tools/gpu_check.sh                               # longer bf16 run
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
  echo "== MoE layer vs the ideal grouped GEMM and DeepSpeed-MoE on the GPU (bf16; runs/bench_moe_gpu.json)"
  mkdir -p runs
  "$PY" tools/bench_moe.py --regime all --sweep --repeats 5 --json runs/bench_moe_gpu.json
  echo "== bf16 training on the GPU: the switch LM preset (d_model 512, 8 layers, 16 experts, 512-byte sequences), 100 steps"
  # a real width, so the matmuls (not the launch overhead) set the pace; MFU against the known bf16 peak
  "$PY" -m moe.train --config examples/configs/tiny_switch_lm.yaml --set model.preset=switch \
    --set parallel.ep=1 --set train.device=cuda --set train.precision=bf16 --set train.steps=100 \
    --set train.global_batch_size=32 --set train.micro_batch_size=32 --set train.log_every=25 \
    --set train.eval_every=0 --set train.checkpoint_every=0 --set data.eval_batches=2 \
    --set train.out_dir=runs/gpu_check_bf16 --set train.overwrite=true --set telemetry.progress_bar=false \
    ${TRAIN_ARGS:-}
  "$PY" - <<'PYEOF'
import json
rows = [json.loads(line) for line in open("runs/gpu_check_bf16/metrics.jsonl") if '"train/loss"' in line]
last = rows[-1]  # the last log window: steady state, past the first steps' warm-up
mfu = last.get("train/mfu")
print(f"bf16 training, steps {last['step'] - 24}-{last['step']}: {last['train/tokens_per_s']:.0f} tokens/s, "
      f"{last['train/model_tflops_per_s']:.1f} model TFLOP/s, MFU "
      + (f"{100 * mfu:.1f}%" if mfu is not None else "n/a (unknown GPU: set telemetry.peak_tflops)"))
PYEOF
else
  echo "== no GPU: benchmark and bf16 training skipped"
fi
