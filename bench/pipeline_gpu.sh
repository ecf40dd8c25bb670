#!/usr/bin/env bash
# Stage-2 pipeline benchmark on one 4-GPU machine: one torchrun per configuration, full preset,
# sequence 8192, Base + Gundam pages mixed with text-only rows (bench/pipeline_gpu.py).
#
# usage (GPU machine, repository root; wheels from ../shared/device/prepare_wheels.sh in .whl/):
#   bash bench/pipeline_gpu.sh [DATA_DIR] [STEPS] [CONFIG ...]
# CONFIG = PP:PARTITION:CHECKPOINTING:GLOBAL_BATCH[:LOSS_CHUNK[:MICRO[:COMPILE[:EXTRA]]]]
#   PARTITION     paper | balanced | parameters        (parallel.partition_method)
#   CHECKPOINTING on | off | comma-separated stages    (model.gradient_checkpointing /
#                                                      parallel.checkpoint_stages, e.g. 1,2)
#   GLOBAL_BATCH  rows of 8192 tokens per optimizer step (= MICRO x accumulation x DP)
#   LOSS_CHUNK    loss tokens per chunk, 0 = whole-row logits (default 2048; empty = default)
#   MICRO         rows per pipeline micro-batch (parallel.micro_batch; default 1; empty = default)
#   COMPILE       on | off: torch.compile (inductor) the repeated blocks of every stage
#                 (parallel.compile_layers; default off)
#   EXTRA         comma-separated further flags of `pipeline_gpu.py train`, e.g.
#                 --profile-step=6,--pg-without-device (they also name the log)
# default: 4:paper:on:16 2:paper:on:16 (PP=4 x DP=1 and PP=2 x DP=2, the paper's split).
# Example, paper vs balanced and checkpointing on vs off in one call:
#   bash bench/pipeline_gpu.sh /tmp/ppb 20 4:paper:on:16 4:balanced:on:16 4:balanced:off:16 4:balanced:off:32
# compiled vs eager, and micro-batch 2:
#   bash bench/pipeline_gpu.sh /tmp/ppb 20 4:balanced:off:32 4:balanced:off:32::1:on 4:balanced:off:32::2:on
# Each configuration prints one JSON summary (tokens/s per GPU, step time, loss first -> last,
# peak and estimated memory per stage, 1F1B bubble); all of them are appended to
# $SUMMARY (default DATA_DIR/summary.jsonl) and rendered as one markdown table at the end. Logs:
# DATA_DIR/pp<PP>_<partition>_ckpt<..>_gb<..>_chunk<..>[_mb<MICRO>][_compile].log (suffixes only
# for MICRO > 1 and COMPILE on, as in the summary's name); with $OUT set, logs and summary
# (pipeline_summary.jsonl) are copied there too. CONFIG_TIMEOUT (seconds, default 0 = none) bounds
# each configuration's torchrun so that one hang cannot eat the whole call.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-/tmp/dsocr-pipeline-bench}
steps=${2:-20}
shift $(( $# < 2 ? $# : 2 ))
configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=(4:paper:on:16 2:paper:on:16)
export TORCH_CUDA_ARCH_LIST=9.0   # DeepSpeed's op builder cannot parse 9.0a
export NCCL_NVLS_ENABLE=0         # NVLink multicast stays off
export OMP_NUM_THREADS=4
if PYTHONPATH=/tmp/site:$PWD python3 -c "import deepspeed, torch" 2>/dev/null; then
  export PYTHONPATH=/tmp/site:$PWD   # wheels installed already (or packages of the image)
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
summary=${SUMMARY:-$root/summary.jsonl}
mkdir -p "$root"
rm -f "$summary"
python3 bench/pipeline_gpu.py make-data "$root"
for config in "${configs[@]}"; do
  IFS=: read -r pp partition ckpt gb chunk micro compile extra <<< "$config"
  chunk=${chunk:-2048} micro=${micro:-1} compile=${compile:-off}
  args=(--pp "$pp" --partition "$partition" --global-batch "$gb" --loss-chunk "$chunk" --micro-batch "$micro")
  case "$ckpt" in
    on) args+=(--checkpointing) ;;
    off) args+=(--no-checkpointing) ;;
    *) args+=(--no-checkpointing --checkpoint-stages "$ckpt") ;;
  esac
  tag=pp${pp}_${partition}_ckpt${ckpt//,/}_gb${gb}_chunk${chunk}
  if [ "$micro" != 1 ]; then tag+=_mb${micro}; fi
  case "$compile" in
    on) args+=(--compile); tag+=_compile ;;
    off) args+=(--no-compile) ;;
    *) echo "=== $config: COMPILE must be on or off, got '$compile'"; continue ;;
  esac
  if [ -n "${extra:-}" ]; then
    IFS=, read -r -a flags <<< "$extra"
    args+=("${flags[@]}")
    tag+=_$(printf '%s' "$extra" | tr -c 'A-Za-z0-9' '_' | tr -s '_' | sed 's/^_//;s/_$//')
  fi
  echo "=== $config: ${args[*]} (start $(date +%T))"
  limit=()
  [ "${CONFIG_TIMEOUT:-0}" -gt 0 ] && limit=(timeout --kill-after 10 "$CONFIG_TIMEOUT")
  # Own session, output to the log file (not a pipe): processes that outlive a timed-out torchrun
  # (inductor's compile workers) would hold a pipe open and hang the whole script; the group is
  # killed after the configuration ends.
  setsid "${limit[@]}" torchrun --standalone --nproc_per_node 4 bench/pipeline_gpu.py train "$root" \
    --steps "$steps" --summary "$summary" "${args[@]}" > "$root/$tag.log" 2>&1 &
  job=$!
  wait "$job" || echo "=== $config failed (exit $?)"
  kill -9 -- -"$job" 2>/dev/null || true
  grep -v "^\[" "$root/$tag.log" || true
  if [ -n "${OUT:-}" ]; then  # after every configuration: a later kill keeps what was measured
    cp "$root/$tag.log" "$OUT/"
    if [ -s "$summary" ]; then cp "$summary" "$OUT/pipeline_summary.jsonl"; fi
  fi
done
if [ -s "$summary" ]; then python3 bench/pipeline_gpu.py table "$summary"; fi
