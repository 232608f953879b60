#!/usr/bin/env bash
# What only a GPU shows, in one run: fp16 with GradScaler (CNN and a GAN's R1 penalty),
# bf16 speed against fp32, MFU of the Transformer (the recipe, and a GPT-2-small-sized one),
# the DeepSpeed and FSDP2 engines on CUDA, torch.compile, TF32, and a model that only fits
# one GPU under FSDP2 with CPU offload and activation checkpointing. Writes one JSON line per
# run to $OUT/gpu.jsonl.
#   bash benchmarks/gpu_report.sh          (on a CUDA machine with dtrain installed)
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
run() {
  name=$1; recipe=$2; shift 2
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0  # ONLY="a b": run just those
  start=$(date +%s)
  if python -m dtrain train "$recipe" tracking.enabled=false output_dir="$OUT/$name" "$@" > "$OUT/$name.log" 2>&1; then
    python - "$OUT/$name/summary.json" "$name" "$(( $(date +%s) - start ))" "$@" <<'PY' | tee -a "$OUT/gpu.jsonl"
import json, sys
s = json.load(open(sys.argv[1]))
keep = {k: s.get(k) for k in ("steps", "global_batch_size", "precision", "engine", "throughput", "final_loss",
                              "initial_loss", "peak_memory_mb", "parameters", "tokens_per_s", "mfu", "compile_s")}
print(json.dumps({"run": sys.argv[2], "wall_s": int(sys.argv[3]), "overrides": sys.argv[4:], **keep, "eval": s["eval"]}))
PY
    grep -E "loss_scale|mfu" "$OUT/$name.log" | tail -1
  else
    echo "{\"run\": \"$name\", \"failed\": true}" | tee -a "$OUT/gpu.jsonl"; tail -20 "$OUT/$name.log"
  fi
}
run cnn_fp16 recipes/cnn_digits.yaml precision=fp16
run cnn_fp32 recipes/cnn_digits.yaml precision=fp32
run gan_ring_fp16_r1 recipes/gan_ring.yaml precision=fp16
run lm_recipe_bf16 recipes/transformer_charlm.yaml precision=bf16 tracking.log_every=100
GPT="model.n_layer=12 model.n_head=12 model.n_embd=768 model.block_size=256 model.dropout=0.0 data.global_batch_size=64 data.max_chars=20000000 train.max_steps=300 train.eval_every_steps=300 tracking.log_every=50 checkpoint.every_steps=0 optim.base_batch_size=64 optim.lr=6e-4 optim.min_lr=6e-5"
# shellcheck disable=SC2086
run lm_gpt2s_bf16 recipes/transformer_charlm.yaml precision=bf16 $GPT
# shellcheck disable=SC2086
run lm_gpt2s_fp32 recipes/transformer_charlm.yaml precision=fp32 $GPT train.max_steps=100 train.eval_every_steps=100
# shellcheck disable=SC2086
run lm_gpt2s_bf16_zero2 recipes/transformer_charlm.yaml precision=bf16 engine=deepspeed deepspeed.zero_stage=2 $GPT
# shellcheck disable=SC2086
run lm_gpt2s_bf16_compile recipes/transformer_charlm.yaml precision=bf16 compile=true $GPT
# shellcheck disable=SC2086
run lm_gpt2s_bf16_fsdp recipes/transformer_charlm.yaml precision=bf16 engine=fsdp $GPT
# shellcheck disable=SC2086
run lm_gpt2s_bf16_fsdp_compile recipes/transformer_charlm.yaml precision=bf16 engine=fsdp compile=true $GPT
# shellcheck disable=SC2086
run lm_gpt2s_fp32_ieee recipes/transformer_charlm.yaml precision=fp32 allow_tf32=false $GPT train.max_steps=100 train.eval_every_steps=100
# ~3.6 B parameters: fp32 weights, gradients and AdamW state alone are ~58 GB before activations.
BIG="model.n_layer=32 model.n_head=24 model.n_embd=3072 model.block_size=256 model.dropout=0.0 data.global_batch_size=8 data.max_chars=20000000 train.max_steps=20 train.eval_every_steps=20 tracking.log_every=5 checkpoint.every_steps=0 optim.base_batch_size=8 optim.lr=1e-4"
# shellcheck disable=SC2086
run lm_3b_ddp recipes/transformer_charlm.yaml precision=bf16 $BIG
# shellcheck disable=SC2086
run lm_3b_fsdp_offload_ac recipes/transformer_charlm.yaml precision=bf16 engine=fsdp fsdp.offload=true model.activation_checkpointing=full $BIG
