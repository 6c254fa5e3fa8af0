# Shell helpers shared by launch/train.sbatch (the batch shell) and launch/node.sh (one per
# node). Sourced, not run. Every setting is an environment variable with a default, so the
# script works both as rendered by `modmoe submit` and as `sbatch launch/train.sbatch CONFIG`.

modmoe_log() {
    printf '[modmoe-launch %s %s] %s\n' "$(date +%H:%M:%S)" "${SLURMD_NODENAME:-$(hostname -s)}" "$*" >&2
}

modmoe_die() {
    modmoe_log "error: $*"
    exit 2
}

# Defaults of the settings (a rendered script exports them before sourcing this file).
modmoe_defaults() {
    : "${MODMOE_PYTHON:=python3}"
    : "${MODMOE_DEVICE:=gpu}"                 # gpu (nccl) | cpu (gloo)
    : "${MODMOE_MAX_REQUEUES:=3}"             # give up after this many restarts
    : "${MODMOE_RUNS_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}/runs}"
    # Keyed by the job id, which survives requeues: every attempt resumes in the same place.
    : "${MODMOE_RUN_DIR:=$MODMOE_RUNS_ROOT/${SLURM_JOB_NAME:-modmoe}-${SLURM_JOB_ID:?not inside a Slurm job}}"
    case "$MODMOE_DEVICE" in
        gpu|cpu) ;;
        *) modmoe_die "MODMOE_DEVICE=$MODMOE_DEVICE: expected gpu or cpu" ;;
    esac
    [[ $MODMOE_MAX_REQUEUES =~ ^[0-9]+$ ]] || modmoe_die "MODMOE_MAX_REQUEUES=$MODMOE_MAX_REQUEUES: expected a count"
    export MODMOE_PYTHON MODMOE_DEVICE MODMOE_MAX_REQUEUES MODMOE_RUNS_ROOT MODMOE_RUN_DIR
}

# Ranks per node: explicit MODMOE_PROCS_PER_NODE, else the GPUs Slurm gave this node (gpu
# mode), else 1 (cpu mode).
modmoe_procs_per_node() {
    if [[ -n ${MODMOE_PROCS_PER_NODE:-} ]]; then
        echo "$MODMOE_PROCS_PER_NODE"
    elif [[ $MODMOE_DEVICE == gpu && -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ $MODMOE_DEVICE == gpu ]] && command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 1
    fi
}

# The first node of the allocation hosts the c10d rendezvous store.
modmoe_first_host() {
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
}

# The address other nodes reach NODE at: its NodeAddr in Slurm's node table, which is the node
# name unless the site set another (a name that does not resolve, or an address per node).
# Neither localhost nor this host's name is assumed to mean the same machine on every node.
modmoe_node_addr() {
    local addr
    addr=$(scontrol show node -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
    echo "${addr:-$1}"
}

# The rendezvous port: MODMOE_RDZV_PORT, else a port that is free on this host right now. The
# batch shell runs on the first node, which hosts the store, so the check is made where it
# counts. A port derived from the job id is not enough: jobs of two clusters (or job ids
# that agree modulo the range) would meet in one rendezvous on a shared node.
modmoe_rdzv_port() {
    if [[ -n ${MODMOE_RDZV_PORT:-} ]]; then
        echo "$MODMOE_RDZV_PORT"
    else
        "${MODMOE_PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
    fi
}
