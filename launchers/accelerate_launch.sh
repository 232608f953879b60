#!/usr/bin/env bash
# accelerate launch with a saved config: multi_process.yaml (DDP) or deepspeed.yaml.
#
#   launchers/accelerate_launch.sh launchers/accelerate/multi_process.yaml recipes/cnn_digits.yaml
#   launchers/accelerate_launch.sh launchers/accelerate/deepspeed.yaml recipes/transformer_charlm.yaml engine=deepspeed
#
# accelerate starts the ranks (through torchrun); dtrain reads their env and runs the
# engine the recipe names. Accelerate's own DeepSpeed plugin is not used for the engine.
set -euo pipefail
config=${1:?usage: $0 ACCELERATE_CONFIG RECIPE [key=value ...]}; recipe=${2:?recipe}; shift 2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec accelerate launch --config_file "$config" -m dtrain train "$recipe" "$@"
