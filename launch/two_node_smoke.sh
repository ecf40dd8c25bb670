#!/usr/bin/env bash
# Multi-node smoke test on one machine: two "nodes" of two processes each, started by two
# launcher invocations (node ranks 0 and 1) against one rendezvous, train a PP 2 x DP 2 job
# through `dsocr-train` (pipeline.cli.train) on freshly rendered webdataset shards.
#
#   bash launch/two_node_smoke.sh [ROOT] [extra Hydra overrides...]
#
# On a 4-GPU machine node 0 gets GPUs 0,1 and node 1 GPUs 2,3 (NCCL), and the model is the
# small encoder + small MoE decoder in Small mode, bf16. Without GPUs (or DS_ACCELERATOR=cpu)
# both nodes run on the CPU with gloo, debug model and debug mode in fp32.
# ROOT (default /tmp/dsocr-two-node) receives the shards, the run directory
# (ROOT/runs/two_node) and one log per node. Exit status: non-zero when either node fails.
# Extra overrides win, e.g. `model.encoder=full model.decoder=full`. Knobs: launch/env.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DSOCR_REPO"

root="${1:-/tmp/dsocr-two-node}"
shift || true
port="${MASTER_PORT:-29517}"
mkdir -p "$root"

if [[ ! -f "$root/train/manifest.json" ]]; then
    python3 -m data_tools.cli synth --out "$root/train" --prefix train -n "${SMOKE_SAMPLES:-256}" \
        --kinds line=1,page=1 --langs en --bundled-fonts --no-progress --overwrite --workers 4
    python3 -m data_tools.cli synth --out "$root/val" --prefix val -n 16 --seed 99 \
        --kinds line=1 --langs en --bundled-fonts --no-progress --overwrite
fi

if command -v nvidia-smi >/dev/null 2>&1 && [[ "${DS_ACCELERATOR:-}" != cpu ]]; then
    gpus=("0,1" "2,3")
    model=(model.encoder=small model.decoder=small "model.decoder_overrides={}" parallel.dtype=bf16)
    mode=small
else
    export DS_ACCELERATOR=cpu
    gpus=("" "")
    model=(model.encoder=debug model.decoder=debug "model.decoder_overrides={}" parallel.dtype=fp32)
    mode=debug
fi
overrides=(
    parallel=pp2dp2 "${model[@]}" model.freeze_sam=true data.kind=webdataset data.seq_len=1024
    "data.sources=[{name:ocr,shards:'$root/train/train-*.tar',modes:{$mode:1.0}}]"
    "data.val_shards='$root/val/val-*.tar'" eval.num_samples=16
    optim.lr=3e-4 optim.warmup_steps=2 train.max_steps="${SMOKE_STEPS:-8}" train.log_every=1
    train.save_every=4 train.eval_every=0 "train.out_dir=$root/runs/two_node" name=two_node
)
pids=()
for node in 0 1; do
    CUDA_VISIBLE_DEVICES="${gpus[$node]}" GPUS_PER_NODE=2 NNODES=2 NODE_RANK="$node" \
        MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" \
        bash launch/node.sh "${overrides[@]}" "$@" >"$root/node$node.log" 2>&1 &
    pids+=("$!")
done
status=0
for node in 0 1; do
    if ! wait "${pids[$node]}"; then
        echo "two_node_smoke: node $node failed (log: $root/node$node.log)" >&2
        tail -n 30 "$root/node$node.log" >&2
        status=1
    fi
done
grep -h "\[train\]\|\[job\]\|step " "$root/node0.log" "$root/node1.log" | tail -n 24 || true
exit "$status"
