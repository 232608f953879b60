#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous (elastic: a lost worker restarts the group,
# which resumes from the last checkpoint). Run the same command on every node:
#
#   NNODES=2 RDZV_ENDPOINT=head-node:29400 launchers/torchrun_multinode.sh recipes/cnn_digits.yaml
#
# NNODES may be a range (1:4) for elastic membership; MAX_RESTARTS bounds the restarts.
# Every node must see output_dir (shared file system or PVC) for checkpoints to resume.
set -euo pipefail
recipe=${1:?usage: $0 RECIPE [key=value ...]}; shift
: "${NNODES:?set NNODES (e.g. 2 or 1:4)}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous}"
# torchrun restarts: give each attempt a fresh store (the agent's shared one keeps a dead
# attempt's keys, pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# Preemption: torchrun forwards SIGUSR1 (SLURM's --signal) to the workers too, which then
# checkpoint after the current step and exit.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
# dtrain's rendezvous backend: c10d, its store listening on the endpoint's address alone (torch's
# own listens on every interface of the host that serves it).
exec torchrun --nnodes "$NNODES" --nproc_per_node "${NPROC_PER_NODE:-gpu}" \
  --rdzv_backend dtrain --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-dtrain}" \
  --max_restarts "${MAX_RESTARTS:-3}" \
  -m dtrain train "$recipe" "$@"
