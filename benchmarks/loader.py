"""Does the lazy image-folder loader keep up with the training step? Samples/s of the loader
alone (decode + resize + normalise + flip/crop augmentation, in 0, 1, 2 workers), of the step
alone (forward + backward + SGD on a batch already in memory), and of real training runs with
each number of workers.

    python benchmarks/loader.py [--images 3000] [--size 64] [--image-size 32] [--batch 64]

Generates a folder of PNGs (3 classes) in a temp dir; the CNN recipe's ResNet at image_size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))


def loader_alone(folder: Path, image_size: int, batch: int, workers: int, batches: int) -> float:
    from dtrain.data import BatchPlan, train_loader
    from dtrain.tasks.cnn import CNNTask
    from dtrain.train.config import load_config

    cfg = load_config(
        ROOT / "recipes" / "cnn_digits.yaml",
        [f"data.path={folder}", f"model.image_size={image_size}", "data.decode=lazy"],
    )
    task = CNNTask(cfg)
    train, _ = task.datasets()
    loader = train_loader(train, BatchPlan(batch, batch, 1, 1), 0, 0, workers, False, task.augmentation())
    it = iter(loader)
    next(it)  # workers started, first batch out
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t)


def step_alone(image_size: int, batch: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from dtrain.tasks.cnn import ResNet

    torch.manual_seed(0)
    model = ResNet(3, 3, [32, 64], 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, image_size, image_size), torch.randint(0, 3, (batch,))
    for i in range(steps + 2):
        if i == 2:
            t = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t)


def training(folder: Path, image_size: int, batch: int, workers: int, steps: int, out: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "dtrain",
        "train",
        str(ROOT / "recipes" / "cnn_digits.yaml"),
        f"data.path={folder}",
        f"model.image_size={image_size}",
        "data.decode=lazy",
        f"data.num_workers={workers}",
        f"data.global_batch_size={batch}",
        f"train.max_steps={steps}",
        "tracking.enabled=false",
        "train.eval_every_steps=1000000",
        "checkpoint.every_steps=0",
        "model.sync_bn=false",
        f"output_dir={out}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=out.parent)
    return float(json.loads((out / "summary.json").read_text())["throughput"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", type=int, default=64, help="side of the stored PNGs")
    ap.add_argument("--image-size", type=int, default=32, help="model.image_size (what they are resized to)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=30)
    args = ap.parse_args()
    from helpers import write_image_folder

    tmp = Path(tempfile.mkdtemp(prefix="dtrain-loader-"))
    folder = write_image_folder(tmp / "images", classes=3, per_class=args.images // 3, size=args.size)
    print(
        f"{args.images} PNGs of {args.size}x{args.size} -> {args.image_size}x{args.image_size}, batch {args.batch}; "
        f"{os.cpu_count()} CPUs ({platform.machine()}), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}\n"
    )
    step = step_alone(args.image_size, args.batch, args.batches)
    print("| workers | loader alone, samples/s | step alone, samples/s | training run, samples/s |")
    print("|---|---|---|---|")
    for w in (0, 1, 2):
        alone = loader_alone(folder, args.image_size, args.batch, w, args.batches)
        run = training(folder, args.image_size, args.batch, w, args.batches * 2, tmp / f"run{w}")
        print(f"| {w} | {alone:,.0f} | {step:,.0f} | {run:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
