#!/usr/bin/env bash
# The GPU measurements of fast and 8-bit inference, in one run (for a lent H100/H200; about 10 minutes):
#
#     bash tools/gpu_checks.sh [OUT_DIR]        # logs to OUT_DIR (default gpu_checks/), one file per benchmark
#
# 1. one XL-2 forward at 1024 px: diffusers fp32 vs ours fp32 / int8 / fp8, eager and compiled (speed and error);
# 2. one 1024 px image end to end against diffusers.PixArtAlphaPipeline in bf16 (PixArt-delta LCM 4 steps and
#    PixArt-alpha DPM 14/20 steps): eager, compiled, compiled + fp8 (our side);
# 3. peak GPU memory of one 1024 px PixArt-delta image, float vs int8, with T5-XXL's real size (random weights).
# Inductor's cache lives in OUT_DIR/inductor-cache, so a second run of this script does not recompile.
set -euo pipefail
out=${1:-gpu_checks}
mkdir -p "$out"
export TORCHINDUCTOR_CACHE_DIR="$PWD/$out/inductor-cache"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
bench() { local name=$1; shift; echo "== $name"; python tools/benchmark.py "$@" 2>&1 | tee "$out/$name.log"; }
bench quantize quantize --device cuda --size 1024 --modes int8 fp8 --reps 10 --no-images
bench pipeline-eager pipeline --size 1024 --dtype bf16 --reps 3
bench pipeline-compiled pipeline --size 1024 --dtype bf16 --reps 3 --compile
bench pipeline-compiled-fp8 pipeline --size 1024 --dtype bf16 --reps 3 --compile --quantize fp8
bench memory memory --device cuda --size 1024 --dtype bf16 --modes none int8 --t5-layers 24
