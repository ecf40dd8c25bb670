#!/usr/bin/env bash
# Stage-2 pipeline benchmark on one 4-GPU machine: PP=4 x DP=1, then PP=2 x DP=2, 20 steps each,
# full preset, sequence 8192, Base + Gundam pages mixed with text-only rows (bench/pipeline_gpu.py).
#
# usage (GPU machine, repository root; wheels from ../shared/device/prepare_wheels.sh in .whl/):
#   bash bench/pipeline_gpu.sh [DATA_DIR] [STEPS]
# Prints one JSON summary per layout: tokens/s per GPU, peak memory per stage, 1F1B bubble, losses.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-/tmp/dsocr-pipeline-bench}
steps=${2:-20}
export TORCH_CUDA_ARCH_LIST=9.0   # DeepSpeed's op builder cannot parse 9.0a
export NCCL_NVLS_ENABLE=0         # NVLink multicast stays off
export OMP_NUM_THREADS=4
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 bench/pipeline_gpu.py make-data "$root"
for pp in 4 2; do
  torchrun --standalone --nproc_per_node 4 bench/pipeline_gpu.py train "$root" --pp "$pp" --steps "$steps" \
    2>&1 | tee "$root/pp${pp}.log" | grep -v "^\[" || true
done
