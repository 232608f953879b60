#!/usr/bin/env bash
# One node, N ranks (default: every GPU, or 2 on a CPU-only machine), any recipe and overrides.
#
#   launchers/torchrun_single.sh recipes/cnn_digits.yaml [key=value ...]
#   NPROC=4 launchers/torchrun_single.sh recipes/transformer_charlm.yaml engine=deepspeed
set -euo pipefail
recipe=${1:?usage: $0 RECIPE [key=value ...]}; shift
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC=${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# torchrun restarts: give each attempt a fresh store (the agent's shared one keeps a dead
# attempt's keys, pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# Preemption: torchrun forwards SIGUSR1 (SLURM's --signal) to the workers too, which then
# checkpoint after the current step and exit.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
# dtrain's rendezvous (torchrun's --standalone, but on loopback): nothing of the job listens
# where another host, or this one's network address, reaches it.
exec torchrun --nnodes 1 --nproc_per_node "$NPROC" \
  --rdzv_backend dtrain --rdzv_endpoint 127.0.0.1:0 --local_addr 127.0.0.1 -m dtrain train "$recipe" "$@"
