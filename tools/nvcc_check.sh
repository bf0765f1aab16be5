#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU and without a CUDA build of torch.
#
#   bash tools/nvcc_check.sh
#
# Every csrc/cuda/*.cu is compiled with nvcc (-c, one arch: sm_80 unless NVCC_CHECK_ARCH
# says otherwise) into a temporary folder; every csrc/cuda/*.cpp (the torch bindings) is
# syntax-checked with the host compiler against torch's and CUDA's headers. Exits 0 with
# "skipped: no nvcc" when nvcc is absent, non-zero when anything fails to compile.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NVCC="$(command -v nvcc || true)"
for candidate in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
  if [[ -z "$NVCC" && -x "$candidate" ]]; then NVCC="$candidate"; fi
done
if [[ -z "$NVCC" ]]; then
  echo "nvcc_check: skipped: no nvcc (set CUDA_HOME or put nvcc on PATH)"
  exit 0
fi
# nvcc may be a wrapper outside the toolkit: find the folder that has cuda_runtime.h.
CUDA_ROOT=""
for candidate in "${CUDA_HOME:-}" "$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)" /usr/local/cuda; do
  if [[ -z "$CUDA_ROOT" && -n "$candidate" && -f "$candidate/include/cuda_runtime.h" ]]; then CUDA_ROOT="$candidate"; fi
done
ARCH="${NVCC_CHECK_ARCH:-sm_80}"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || true)"; fi
fi

TORCH_INC=()
PY_INC=""
if [[ -n "$PY" ]] && TORCH_PATHS="$("$PY" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))' 2>/dev/null)"; then
  while IFS= read -r p; do TORCH_INC+=("-I$p"); done <<< "$TORCH_PATHS"
  PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
else
  echo "nvcc_check: torch is not importable: checking the .cu kernels only (not the torch bindings)"
fi

OUT="$(mktemp -d /tmp/nvcc_check.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT
status=0
shopt -s nullglob
echo "nvcc_check: $("$NVCC" --version | tail -1), arch $ARCH"
for src in csrc/cuda/*.cu; do
  start=$SECONDS
  # The half/bfloat16 macros are the ones torch.utils.cpp_extension passes to nvcc.
  if "$NVCC" -std=c++17 -O3 -arch="$ARCH" -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Icsrc/cuda "${TORCH_INC[@]}" \
      -c "$src" -o "$OUT/$(basename "$src").o"; then
    echo "  ok    $src ($((SECONDS - start))s)"
  else
    echo "  FAIL  $src"
    status=1
  fi
done
if [[ ${#TORCH_INC[@]} -gt 0 && -z "$CUDA_ROOT" ]]; then
  echo "nvcc_check: cuda_runtime.h not found (set CUDA_HOME): the torch bindings were not checked"
elif [[ ${#TORCH_INC[@]} -gt 0 ]]; then
  CXX="${CXX:-g++}"
  for src in csrc/cuda/*.cpp; do
    start=$SECONDS
    # A CPU build of torch ships c10/cuda headers but not their generated config header.
    if "$CXX" -std=c++20 -fsyntax-only -DMOE_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Icsrc/cuda -Icsrc/cpu \
        "${TORCH_INC[@]}" -I"$PY_INC" -I"$CUDA_ROOT/include" "$src"; then
      echo "  ok    $src ($((SECONDS - start))s, host syntax check)"
    else
      echo "  FAIL  $src"
      status=1
    fi
  done
fi
if [[ $status -eq 0 ]]; then echo "nvcc_check: all CUDA sources compile"; else echo "nvcc_check: FAILED"; fi
exit $status
