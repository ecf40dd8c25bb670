#!/usr/bin/env bash
# Train on the GPUs of this machine: one process per GPU.
#
#   bash launch/single_node.sh experiment=node8_stage2
#   GPUS_PER_NODE=4 bash launch/single_node.sh parallel=pp2 model=debug
#   LAUNCHER=deepspeed bash launch/single_node.sh experiment=node8_stage2
#
# LAUNCHER=torchrun (default: `torchrun --standalone`) or deepspeed (`deepspeed --no_local_rank`:
# the launcher's `--local_rank=N` argument would break Hydra's command line; LOCAL_RANK comes
# from the environment). GPUS_PER_NODE defaults to CUDA_VISIBLE_DEVICES or nvidia-smi. The run
# name (and so the run directory runs/<name>) is `name=`, $RUN_NAME, or the experiment.
# DRY_RUN=1 prints the launcher command. Knobs: launch/env.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DSOCR_REPO"

LAUNCHER="${LAUNCHER:-torchrun}"
NPROC="$(dsocr_gpus_per_node)"
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$NPROC'"
dsocr_set_threads "$NPROC"
mapfile -t ARGS < <(dsocr_train_args "$@")

case "$LAUNCHER" in
    torchrun)
        dsocr_exec torchrun --standalone --nnodes=1 --nproc-per-node="$NPROC" \
            -m "$DSOCR_MODULE" "${ARGS[@]}"
        ;;
    deepspeed)
        dsocr_exec deepspeed --num_gpus="$NPROC" --master_port="${MASTER_PORT:-29500}" \
            --no_local_rank --module "$DSOCR_MODULE" "${ARGS[@]}"
        ;;
    *) die "LAUNCHER must be torchrun or deepspeed, got '$LAUNCHER'" ;;
esac
