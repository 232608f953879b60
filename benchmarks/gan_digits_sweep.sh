#!/usr/bin/env bash
# Digits GAN configurations side by side, one process each (on one GPU, or CPU cores), eval lines
# of each printed at the end. What chose recipes/gan_digits.yaml: benchmarks/results/gan_digits_sweep_h100.txt
#   OUT=runs/gan_sweep LIMIT_S=470 bash benchmarks/gan_digits_sweep.sh
set -uo pipefail
OUT=${OUT:-runs/gan_sweep}
mkdir -p "$OUT"
python - <<'PY'
from dtrain.data import images
from dtrain.tasks.gan import quality
train, _ = datasets.digits(0.2, normalize=False)
gan_eval.digits_classifier(*train.tensors)  # train and cache the feature classifier once, before the runs
PY
OLD="model.channels=32 gan.loss=hinge gan.penalty=none"  # the recipe before the sweep
L="train.max_steps=16000 train.eval_every_steps=4000"
declare -A C=(
  [old]="$OLD train.max_steps=8000"
  [old_ch64]="$OLD model.channels=64 $L"
  [recipe]="$L"
  [recipe_seed1]="$L seed=1"
  [recipe_ch96]="model.channels=96 $L"
  [recipe_gamma03]="gan.penalty_weight=0.3 $L"
  [recipe_lazy4]="gan.penalty_every=4 $L"
  [recipe_no_sn_gamma1]="model.spectral_norm_d=false gan.penalty_weight=1.0 $L"
)
for name in "${!C[@]}"; do
  # shellcheck disable=SC2086
  timeout "${LIMIT_S:-0}" python -m dtrain train recipes/gan_digits.yaml tracking.enabled=false checkpoint.every_steps=0 \
    output_dir="$OUT/$name" ${C[$name]} > "$OUT/$name.log" 2>&1 &
done
wait
for name in "${!C[@]}"; do echo "== $name: ${C[$name]}"; grep "eval @" "$OUT/$name.log" | tail -2; done
