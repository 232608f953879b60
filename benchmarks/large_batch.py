"""Where the linear-scaling rule ends and LARS begins: the digits CNN at a base batch of 32
and at 4x and 16x that batch, SGD with the linear rule and 5 warmup epochs against LARS with
the same rule and warmup, every run 30 epochs (the same samples), one process each. Prints
the test accuracy and its gap to the base batch (the `dtrain compare` verdict's number).

    python benchmarks/large_batch.py [--epochs 30] [--lars-lr 0.25]

The digits training set has 1,437 images: 44 steps per epoch at batch 32, 11 at 128, 2 at
512 (the last batch of an epoch is dropped), so at 16x the whole run is 60 optimizer steps.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "cnn_digits.yaml"


def train(cwd: Path, name: str, overrides: list[str]) -> dict:
    out = cwd / name
    cmd = [
        sys.executable,
        "-m",
        "dtrain",
        "train",
        str(RECIPE),
        "tracking.enabled=false",
        "checkpoint.every_steps=0",
        "data.augment=false",
        f"output_dir={out}",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lars-lr", type=float, default=0.25, help="LARS LR at batch 32 (scaled by the linear rule)")
    args = p.parse_args()
    common = [
        f"train.epochs={args.epochs}",
        "optim.base_batch_size=32",
        "optim.scale_rule=linear",
        "optim.warmup_epochs=5",
        "optim.warmup_steps=0",
    ]
    sgd = ["optim.name=sgd", "optim.lr=0.025"]
    lars = ["optim.name=lars", f"optim.lr={args.lars_lr}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        base = train(cwd, "base", [*common, *sgd, "data.global_batch_size=32"])
        rows.append(("SGD", 32, base))
        for mult in (4, 16):
            batch = 32 * mult
            for name, opt in (("SGD", sgd), ("LARS", lars)):
                rows.append(
                    (name, batch, train(cwd, f"{name}-{batch}", [*common, *opt, f"data.global_batch_size={batch}"]))
                )
    acc0 = base["eval"]["accuracy"]
    print(
        f"\nDigits CNN, {args.epochs} epochs per run, linear rule from batch 32 + 5 warmup epochs, 1 process; "
        f"{platform.machine()}, {os.cpu_count()} cores\n"
    )
    print("| optimizer | global batch | steps | scaled LR | test accuracy | gap to batch 32 |")
    print("|---|---|---|---|---|---|")
    for name, batch, s in rows:
        acc = s["eval"]["accuracy"]
        gap = "baseline" if s is base else f"{100 * (acc - acc0):+.1f} points"
        print(f"| {name} | {batch} | {s['steps']} | {s['lr']:.4g} | {100 * acc:.1f} % | {gap} |")


if __name__ == "__main__":
    main()
