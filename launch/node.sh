#!/usr/bin/env bash
# Start one node's share of a training job: run it once on every node (by hand, with pdsh,
# or via launch/slurm.sbatch), all with the same arguments and rendezvous.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash launch/node.sh experiment=...
#
# Two "nodes" of 2 GPUs on one 4-GPU machine (PP 2 x DP 2 smoke test, launch/README.md):
#   CUDA_VISIBLE_DEVICES=0,1 NNODES=2 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
#       bash launch/node.sh parallel=pp2dp2 name=pp2dp2 &
#   CUDA_VISIBLE_DEVICES=2,3 NNODES=2 NODE_RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
#       bash launch/node.sh parallel=pp2dp2 name=pp2dp2
#
# Variables (SLURM's are used when set): NNODES (SLURM_JOB_NUM_NODES, default 1), NODE_RANK
# (SLURM_NODEID, default 0), GPUS_PER_NODE (default: CUDA_VISIBLE_DEVICES or nvidia-smi),
# MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default 29500),
# LAUNCHER=torchrun (default, static rendezvous) | deepspeed (`deepspeed --no_ssh` with
# HOSTFILE, one line per node "host slots=N"; launch/slurm.sbatch writes it),
# DRY_RUN=1 prints the launcher command instead of running it. Knobs: launch/env.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DSOCR_REPO"

NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCHER="${LAUNCHER:-torchrun}"
NPROC="$(dsocr_gpus_per_node)"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || ((NODE_RANK >= NNODES)); then
    die "NODE_RANK=$NODE_RANK must lie in [0, NNODES=$NNODES)"
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$NPROC'"
dsocr_set_threads "$NPROC"
mapfile -t ARGS < <(dsocr_train_args "$@")

case "$LAUNCHER" in
    torchrun)
        dsocr_exec torchrun \
            --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC" \
            --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
            -m "$DSOCR_MODULE" "${ARGS[@]}"
        ;;
    deepspeed)
        [[ -n "${HOSTFILE:-}" && -f "$HOSTFILE" ]] || die "LAUNCHER=deepspeed needs HOSTFILE (lines 'host slots=N')"
        dsocr_exec deepspeed --hostfile="$HOSTFILE" --no_ssh --node_rank="$NODE_RANK" \
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
            --no_local_rank --module "$DSOCR_MODULE" "${ARGS[@]}"
        ;;
    *) die "LAUNCHER must be torchrun or deepspeed, got '$LAUNCHER'" ;;
esac
