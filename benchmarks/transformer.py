"""Transformer recipe on CPU ranks: dtrain against a plain PyTorch loop of the same model
(tokens/s), then DDP against DeepSpeed ZeRO-1/2/3 and FSDP2, eager and compiled, on 2 ranks
(tokens/s, peak memory per rank).

    python benchmarks/transformer.py [--steps 80] [--rounds 3]

Prints Markdown tables for the README. All runs use the recipe's model and batch, fp32.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dtrain.runtime.launch import torchrun_launcher

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "transformer_charlm.yaml"
PY = sys.executable
COMMON = [
    "tracking.enabled=false",
    "train.eval_every_steps=1000000",
    "checkpoint.every_steps=0",
    "checkpoint.overwrite=true",
    "data.max_chars=1000000",
    "data.eval_blocks=8",
]


def plain_loop(steps: int) -> float:
    """The hand-written baseline, in this process: same model, data, AdamW, warmup+cosine, clipping."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, DistributedSampler

    from dtrain.tasks.transformer import TransformerTask
    from dtrain.train.config import load_config

    cfg = load_config(RECIPE, COMMON)
    task = TransformerTask(cfg)
    train, _ = task.datasets()
    torch.manual_seed(0)
    model = task.build_model()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=2e-3, betas=(0.9, 0.99)
    )
    warm, total = 60, 600
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        ),
    )
    loader = DataLoader(train, batch_size=32, sampler=DistributedSampler(train, 1, 0, seed=0), drop_last=True)
    it, t0 = iter(loader), None
    for step in range(steps):
        if step == 5:
            t0 = time.perf_counter()
        x, y = next(it)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            loss.item()
    return (steps - 5) * 32 * 128 / (time.perf_counter() - t0)


def plain(cwd: Path, steps: int) -> float:
    """The plain loop in its own process, with dtrain's malloc thresholds, like the dtrain runs."""
    from dtrain.runtime.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
        "PYTHONPATH": str(ROOT / "platform"),
    }
    out = subprocess.run(
        [PY, __file__, "--plain", f"--steps={steps}"], cwd=cwd, env=env, capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def dtrain(nproc: int, steps: int, cwd: Path, *overrides: str) -> dict:
    out = cwd / f"run-{nproc}-{'-'.join(overrides) or 'ddp'}"
    args = ["-m", "dtrain", "train", str(RECIPE), *COMMON, f"train.max_steps={steps}", f"output_dir={out}", *overrides]
    cmd = [PY, *args] if nproc == 1 else [*torchrun_launcher(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain:
        print(json.dumps({"tokens_per_s": plain_loop(args.steps)}))
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        plain_runs, ours = [], []
        for _ in range(args.rounds):
            plain_runs.append(plain(cwd, args.steps))
            ours.append(dtrain(1, args.steps, cwd)["tokens_per_s"])
        engines = {}
        for name, extra in (
            []
            if os.environ.get("SKIP_ENGINES")
            else [
                ("DDP", []),
                ("ZeRO-1", ["engine=deepspeed", "deepspeed.zero_stage=1"]),
                ("ZeRO-2", ["engine=deepspeed", "deepspeed.zero_stage=2"]),
                ("ZeRO-3", ["engine=deepspeed", "deepspeed.zero_stage=3"]),
                ("FSDP2", ["engine=fsdp"]),
                ("DDP, compile=true", ["compile=true"]),
                ("FSDP2, compile=true", ["engine=fsdp", "compile=true"]),
            ]
        ):
            runs = [dtrain(2, args.steps, cwd, *extra) for _ in range(args.rounds)]
            engines[name] = (
                statistics.median(r["tokens_per_s"] for r in runs),
                max(r["peak_memory_mb"] for r in runs),
                runs[-1]["final_loss"],
            )
    print(
        f"\nTransformer recipe (817k parameters, batch 32 x 128 tokens, fp32), {args.steps} steps, median of "
        f"{args.rounds}; {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n"
    )
    mp, mo = statistics.median(plain_runs), statistics.median(ours)
    print("| 1 process | tokens/s |\n|---|---|")
    print(f"| plain PyTorch loop | {mp:.0f} |\n| dtrain | {mo:.0f} |\n| dtrain / plain | {mo / mp:.3f} |\n")
    if not engines:
        return
    print("| 2 CPU ranks | tokens/s (global) | peak memory per rank (MB, RSS) | loss at the last step |")
    print("|---|---|---|---|")
    for name, (tps, mem, loss) in engines.items():
        print(f"| {name} | {tps:.0f} | {mem:.0f} | {loss:.4f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "platform"))
    main()
