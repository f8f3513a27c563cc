#!/usr/bin/env bash
# Every GPU measurement and every CUDA path of sample.py in one run, for a lent H100/H200 (about 9 minutes):
#
#     bash tools/gpu_checks.sh [OUT_DIR]     # OUT_DIR/gpu_checks.md (tables), gpu_checks.json (rows), log.txt
#
# What runs and in which order: tools/gpu_checks.py's docstring. Each check has its own time limit and a failing one
# is recorded, not fatal. Inductor's cache lives in OUT_DIR/inductor-cache, so a second run does not recompile.
set -euo pipefail
out=${1:-gpu_checks}
mkdir -p "$out"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/$out/inductor-cache}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt" || true
python tools/gpu_checks.py --out "$out" "${@:2}"
