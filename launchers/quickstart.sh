#!/usr/bin/env bash
# One command from a fresh clone: set up .venv/, then train the CNN recipe on 2 ranks with torchrun.
#
#   bash launchers/quickstart.sh [dotted.key=value ...]
#
# Runs go to runs/cnn_digits/ and the MLflow store ./mlflow.db (see README: MLflow UI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/setup.sh
NPROC=${NPROC:-2}
# gloo ranks on a CPU share its cores: one intra-op thread each avoids oversubscription.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# torchrun restarts: give each attempt a fresh store (the agent's shared one keeps a dead
# attempt's keys, pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# Preemption: torchrun forwards SIGUSR1 (SLURM's --signal) to the workers too, which then
# checkpoint after the current step and exit.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
# dtrain's rendezvous (torchrun's --standalone, but on loopback): nothing of the job listens
# where another host, or this one's network address, reaches it.
exec .venv/bin/torchrun --nnodes 1 --nproc_per_node "$NPROC" \
  --rdzv_backend dtrain --rdzv_endpoint 127.0.0.1:0 --local_addr 127.0.0.1 -m dtrain train recipes/cnn_digits.yaml "$@"
