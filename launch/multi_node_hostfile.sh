#!/usr/bin/env bash
# Train on several nodes from one head node with the DeepSpeed launcher: it reads a hostfile,
# reaches every node over passwordless ssh (pdsh) and starts one process per GPU there.
#
#   bash launch/multi_node_hostfile.sh experiment=paper_stage2          # uses ./hostfile
#   HOSTFILE=~/hosts NUM_NODES=2 bash launch/multi_node_hostfile.sh experiment=node8_stage2 parallel.dp=null
#
# hostfile: one line per node, `hostname slots=<GPUs>` (comments with #). The repository (and
# its .venv) must sit at the same path on every node (a shared file system): pdsh runs in this
# directory with this Python. Variables: HOSTFILE (default ./hostfile), MASTER_ADDR (default
# the first host), MASTER_PORT (default 29500), NUM_NODES / GPUS_PER_NODE (default: all hosts,
# all slots), DS_LAUNCHER (pdsh default; openmpi, mvapich, ...), DRY_RUN=1 prints the command.
# The knobs of launch/env.sh, DSOCR_*, WANDB_* (not the API key: use ~/.netrc on the nodes)
# and HF_* reach the remote nodes through a DeepSpeed env file written to runs/<name>/launch/.
set -euo pipefail
# shellcheck source=SCRIPTDIR/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DSOCR_REPO"

HOSTFILE="${HOSTFILE:-hostfile}"
[[ -f "$HOSTFILE" ]] || die "hostfile '$HOSTFILE' not found (lines 'hostname slots=N'; set HOSTFILE)"
HOSTFILE="$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")"
mapfile -t HOSTS < <(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF { print $1 }')
((${#HOSTS[@]} > 0)) || die "hostfile '$HOSTFILE' lists no host"
while read -r host slots rest; do
    [[ "$slots" =~ ^slots=[1-9][0-9]*$ && -z "$rest" ]] || die "hostfile line '$host $slots $rest' is not 'hostname slots=N'"
done < <(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF')

MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
MASTER_PORT="${MASTER_PORT:-29500}"
mapfile -t ARGS < <(dsocr_train_args "$@")
NAME="$(dsocr_run_name "${ARGS[@]}")"

# Environment for the remote nodes (DeepSpeed forwards only NCCL_*, PYTHON*, UCX_* by itself).
LAUNCH_DIR="runs/$NAME/launch"
mkdir -p "$LAUNCH_DIR"
DS_ENV_FILE="$PWD/$LAUNCH_DIR/deepspeed_env"
export DS_ENV_FILE
env | grep -E '^(NCCL_|TORCH_|OMP_NUM_THREADS=|PYTORCH_|DSOCR_|WANDB_|HF_|CUDA_DEVICE_MAX_CONNECTIONS=)' |
    grep -v '^WANDB_API_KEY=' | sort >"$DS_ENV_FILE" || true

CMD=(deepspeed --hostfile="$HOSTFILE" --launcher="${DS_LAUNCHER:-pdsh}"
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
[[ -n "${NUM_NODES:-}" ]] && CMD+=(--num_nodes="$NUM_NODES")
[[ -n "${GPUS_PER_NODE:-}" ]] && CMD+=(--num_gpus="$GPUS_PER_NODE")
CMD+=(--no_local_rank --module "$DSOCR_MODULE" "${ARGS[@]}")
dsocr_exec "${CMD[@]}"
