#!/usr/bin/env bash
# One srun task per node: starts torchrun for this node's ranks, which meet the other nodes
# at the c10d rendezvous on the first node. Arguments: CONFIG [--set key=value ...].
# Called by launch/train.sbatch, which exports MODMOE_RDZV_ENDPOINT and MODMOE_RDZV_ID.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
modmoe_defaults

nproc=$(modmoe_procs_per_node)
[[ $nproc =~ ^[1-9][0-9]*$ ]] || modmoe_die "ranks per node = '$nproc': expected a positive count"

# Split this node's CPUs among its ranks so intra-op threads do not oversubscribe.
cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}

if [[ $MODMOE_DEVICE == gpu ]]; then
    # Fail a hung collective instead of waiting forever, so the job can be requeued.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    [[ -n ${MODMOE_SOCKET_IFNAME:-} ]] && export NCCL_SOCKET_IFNAME=$MODMOE_SOCKET_IFNAME
else
    # CPU mode: no GPU may be picked up, so the trainer chooses gloo.
    export CUDA_VISIBLE_DEVICES=""
fi
[[ -n ${MODMOE_SOCKET_IFNAME:-} ]] && export GLOO_SOCKET_IFNAME=$MODMOE_SOCKET_IFNAME

attempt=${SLURM_RESTART_COUNT:-0}
# Node 0 (the batch host, the first in the node list) hosts the rendezvous store: said outright,
# because torchrun's guess (is the endpoint one of my names or addresses?) fails where the
# endpoint is an address the node does not know as its own, or a name every node answers to.
# Each agent announces its own NodeAddr, where the other nodes' ranks reach its store.
node_rank=${SLURM_NODEID:-0}
is_host=0
(( node_rank == 0 )) && is_host=1
local_addr=$(modmoe_node_addr "${SLURMD_NODENAME:-$(hostname -s)}")
modmoe_log "node rank $node_rank/${SLURM_NNODES:-1} ($local_addr): $nproc $MODMOE_DEVICE rank(s)," \
    "rendezvous ${MODMOE_RDZV_ENDPOINT:?} id ${MODMOE_RDZV_ID:?}, attempt $attempt"

exec "$MODMOE_PYTHON" -m torch.distributed.run \
    --nnodes "${SLURM_NNODES:-1}" \
    --nproc-per-node "$nproc" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MODMOE_RDZV_ENDPOINT" \
    --rdzv-id "$MODMOE_RDZV_ID" \
    --rdzv-conf "is_host=$is_host" \
    --local-addr "$local_addr" \
    --max-restarts 0 \
    --log-dir "$MODMOE_RUN_DIR/logs/torchrun/attempt$attempt-node${SLURM_NODEID:-0}" \
    --tee 3 \
    -m modmoe train "$@"
