"""Memory per rank by kind (parameters, gradients, optimizer state, activations) for each
engine and activation-checkpointing mode, on 2 gloo CPU ranks, measured by torch's
MemTracker (it follows every tensor's storage, so it works on CPU and counts exactly what a
GPU's allocator would hold, without the allocator's caching).

    python benchmarks/memory.py [--layers 8] [--embd 256] [--batch 16] [--block 128]

One training step (forward, backward, AdamW step) through dtrain's own `fit.build` and
the task's `train_step`, after one warm-up step so that the optimizer state exists. Prints a
Markdown table for the README.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "transformer_charlm.yaml"
KINDS = ["PARAM", "GRAD", "OPT", "ACT", "TEMP"]
CASES = [
    ("DDP", ["engine=ddp"]),
    ("FSDP2", ["engine=fsdp"]),
    ("FSDP2, no reshard after forward", ["engine=fsdp", "fsdp.reshard_after_forward=false"]),
    ("FSDP2 + selective AC", ["engine=fsdp", "model.activation_checkpointing=selective"]),
    ("FSDP2 + full AC", ["engine=fsdp", "model.activation_checkpointing=full"]),
    ("DDP + full AC", ["engine=ddp", "model.activation_checkpointing=full"]),
]


def measure(rank: int, world: int, store: str, overrides: list[str], out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed._tools.mem_tracker import MemTracker

    from dtrain import data
    from dtrain.train import fit
    from dtrain.train.config import load_config

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = load_config(RECIPE, ["tracking.enabled=false", "data.max_chars=300000", *overrides])
    parts = fit.build(cfg, torch.device("cpu"))
    batches = iter(parts.loader)

    def step() -> None:
        micro = [data.move(next(batches), torch.device("cpu")) for _ in range(parts.micro)]
        parts.task.train_step(parts.engines, micro)

    step()  # the optimizer state exists from here on
    tracker = MemTracker()
    tracker.track_external(*[e.module for e in parts.engines.values()], *[e.optimizer for e in parts.engines.values()])  # type: ignore[attr-defined]
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    by_kind = {k.split(".")[-1]: v for k, v in ((str(k), v) for k, v in peak.items())}
    if rank == 0:
        Path(out).write_text(repr(by_kind))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--block", type=int, default=128)
    args = p.parse_args()
    import torch
    import torch.multiprocessing as mp

    model = [
        f"model.n_layer={args.layers}",
        f"model.n_embd={args.embd}",
        "model.n_head=8",
        f"model.block_size={args.block}",
        f"data.global_batch_size={args.batch}",
        "model.dropout=0.0",
    ]
    rows = []
    for name, extra in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "peak")
            mp.spawn(
                measure,
                args=(2, os.path.join(tmp, "store"), [*model, *extra, f"output_dir={tmp}/o"], out),
                nprocs=2,
                join=True,
            )
            peak = eval(Path(out).read_text())
        rows.append((name, peak))
    n_params = 12 * args.layers * args.embd**2
    print(
        f"\nTransformer, {args.layers} x {args.embd} (~{n_params / 1e6:.1f} M parameters in the blocks), "
        f"{args.batch} x {args.block} tokens per step over 2 ranks, fp32, AdamW; peak MiB on rank 0 by kind "
        f"(torch MemTracker), torch {torch.__version__}\n"
    )
    print("| engine | parameters | gradients | optimizer | activations | temporaries | peak total |")
    print("|---|---|---|---|---|---|---|")
    for name, peak in rows:
        cells = " | ".join(f"{peak.get(k, 0) / 2**20:.1f}" for k in KINDS)
        print(f"| {name} | {cells} | {peak['Total'] / 2**20:.1f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "platform"))
    main()
