#!/usr/bin/env bash
# The README's GAN ablation: the ring recipe on 2 CPU ranks, one component changed per row.
#   bash benchmarks/gan_ablation.sh [recipe] > ablation.jsonl
set -euo pipefail
recipe=${1:-recipes/gan_ring.yaml}
out=${OUT:-runs/ablation}
export OMP_NUM_THREADS=1
row() {
  name=$1; shift
  dtrain train "$recipe" --nproc-per-node 2 tracking.experiment=gan_ablation \
    tracking.run_name="$name" output_dir="$out/$name" "$@" >/dev/null 2>&1 || { echo "{\"row\": \"$name\", \"failed\": true}"; return; }
  python -c "import json,sys; s=json.load(open('$out/$name/summary.json')); print(json.dumps({'row': '$name', 'args': sys.argv[1:], **s['eval'], 'train_time_s': round(s['train_time_s'])}))" "$@"
}
row default
row ttur optim_g.lr=5.0e-4 optim_d.lr=1.0e-3
row sn_and_r1 model.spectral_norm_d=true
row no_penalty gan.penalty=none
row sn_hinge_no_penalty gan.penalty=none gan.loss=hinge model.spectral_norm_d=true
row wgan_gp gan.loss=wgan gan.penalty=wgan_gp gan.penalty_weight=1.0 gan.n_critic=2
row lazy_r1 gan.penalty_every=4
row no_ema gan.ema_decay=0
