# shellcheck shell=bash
# Environment knobs and helpers shared by the launch scripts (sourced, never executed).
#
# Every knob keeps a value you export before launching; the defaults:
#   NCCL_NVLS_ENABLE=0        NVLink SHARP (multicast) off: it needs fabric-manager/IMEX
#                             support that many clusters and containers lack, and NCCL then
#                             fails at communicator init. Set 1 on systems where it works.
#   NCCL_DEBUG=WARN           INFO when debugging hangs (add NCCL_DEBUG_SUBSYS=INIT,NET).
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1
#                             a failed collective aborts the job instead of hanging.
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_DISABLE
#                             not set here: set them for your fabric (e.g. NCCL_SOCKET_IFNAME=ib0
#                             or =eth0 when the default interface is not routable between nodes).
#   TORCH_CUDA_ARCH_LIST      sanitised: DeepSpeed's op builder cannot parse arch suffixes such
#                             as `9.0a` (some GPU images set them); `9.0a` becomes `9.0`, `+PTX`
#                             is kept. Unset: DeepSpeed detects the local GPUs.
#   OMP_NUM_THREADS           CPU cores per node / processes per node (at least 1), so the
#                             data workers and torch's CPU ops do not oversubscribe the node.
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
#                             less fragmentation with variable-length (packed, multi-view) batches.
#   PYTHONUNBUFFERED=1        log lines reach the scheduler's log as they happen.
#   DS_ACCELERATOR            leave unset on GPU nodes; `cpu` for gloo runs without GPUs.
#   DSOCR_MODULE=pipeline.cli.train
#                             the Python module every rank runs; launch.check_dist tests the
#                             rendezvous, rank layout and collectives without a model.
# The training code reads WORLD_SIZE/RANK/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the
# environment the launcher sets (pipeline.parallel.topology.dist_env), never from argv.
# Data and tokenizer paths of the presets: DSOCR_DATA, DSOCR_TOKENIZER (configs/experiment).

DSOCR_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DSOCR_REPO

export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export PYTHONUNBUFFERED=1
export DSOCR_MODULE="${DSOCR_MODULE:-pipeline.cli.train}"

# Strip letter suffixes from compute capabilities: "8.0;9.0a+PTX" -> "8.0;9.0+PTX".
dsocr_sanitize_arch_list() {
    printf '%s\n' "$1" | sed -E 's/([0-9]+\.[0-9]+)[a-zA-Z]+/\1/g'
}
if [[ -n "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$(dsocr_sanitize_arch_list "$TORCH_CUDA_ARCH_LIST")"
    export TORCH_CUDA_ARCH_LIST
fi

die() {
    echo "launch: $*" >&2
    exit 2
}

# GPUs this node runs processes for: $GPUS_PER_NODE, else CUDA_VISIBLE_DEVICES, else nvidia-smi.
dsocr_gpus_per_node() {
    if [[ -n "${GPUS_PER_NODE:-}" ]]; then
        echo "$GPUS_PER_NODE"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local ids
        IFS=',' read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        die "cannot count GPUs: set GPUS_PER_NODE"
    fi
}

# OMP_NUM_THREADS = cores / processes per node unless already set.
dsocr_set_threads() {
    local procs="$1" cores
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        cores="$(nproc 2>/dev/null || echo 1)"
        OMP_NUM_THREADS=$((cores / procs))
        ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
        export OMP_NUM_THREADS
    fi
}

# The run name every rank of a job shares (Hydra pins hydra.run.dir to runs/${name}):
# a `name=` argument, else $RUN_NAME, else the experiment (+ the SLURM job id inside SLURM),
# else "default".
dsocr_run_name() {
    local arg experiment=""
    for arg in "$@"; do
        case "$arg" in
            name=*) echo "${arg#name=}"; return ;;
            experiment=*) experiment="${arg#experiment=}" ;;
        esac
    done
    if [[ -n "${RUN_NAME:-}" ]]; then
        echo "$RUN_NAME"
    elif [[ -n "$experiment" ]]; then
        echo "${experiment}${SLURM_JOB_ID:+-$SLURM_JOB_ID}"
    else
        echo "default${SLURM_JOB_ID:+-$SLURM_JOB_ID}"
    fi
}

# The Hydra arguments with `name=` appended when the caller did not give one.
dsocr_train_args() {
    local arg name
    name="$(dsocr_run_name "$@")"
    for arg in "$@"; do
        [[ "$arg" == name=* ]] && { printf '%s\n' "$@"; return; }
    done
    printf '%s\n' "$@" "name=$name"
}

# Run a command, or with DRY_RUN=1 print it (one shell-quoted line) and return.
dsocr_exec() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@"
        printf '\n'
        return 0
    fi
    exec "$@"
}
