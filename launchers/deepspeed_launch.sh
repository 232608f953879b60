#!/usr/bin/env bash
# The deepspeed launcher: one node (localhost), or the nodes of a hostfile over ssh/pdsh.
#
#   launchers/deepspeed_launch.sh recipes/transformer_charlm.yaml deepspeed.zero_stage=2
#   HOSTFILE=launchers/hostfile launchers/deepspeed_launch.sh recipes/transformer_charlm.yaml
#
# engine=deepspeed is added for you; the rank comes from the launcher's environment.
set -euo pipefail
recipe=${1:?usage: $0 RECIPE [key=value ...]}; shift
args=(--module)
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE")
else
  args+=(--num_nodes 1 --num_gpus "${NPROC:-2}")
fi
exec deepspeed "${args[@]}" dtrain train "$recipe" engine=deepspeed "$@"
