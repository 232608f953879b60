"""Combining models, measured on the digits (held-out 360 images), 2 CPU ranks by default.

    python benchmarks/combining.py [--only distill|ewc] [--steps 44,88,176] [--seeds 0,1,2]
                                   [--lambdas 1,10,100] [--nproc 2]

Distillation: a small student distilled from the recipe's CNN against the same student trained
alone, for the same steps.

The teacher is `recipes/cnn_digits.yaml` as shipped (a 2-stage ResNet, 30 epochs). The student
is 8x smaller in width and depth (one stage of 16 channels, one block) and gets the same recipe
otherwise (no augmentation, so both see the same images; LR 0.2 at its batch of 64). Each
(steps, seed) pair trains twice, alone and with `distill.teacher` (T 4, alpha 0.9); the table
gives the mean and range over the seeds and the gap.

EWC: the student's architecture trained on digits 0-4 (15 epochs), then on 5-9 (8 epochs)
from there, plainly (`model.init_from`) and with `ewc.from` at each lambda; each model's
accuracy on both halves (`dtrain evaluate ... data.classes=[...]`). Prints Markdown.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "cnn_digits.yaml")
STUDENT = [
    "model.widths=[16]",
    "model.blocks_per_stage=1",
    "optim.lr=0.8",
    "optim.warmup_steps=10",
    "data.augment=false",
    "train.eval_every_steps=0",
]
QUIET = ["tracking.enabled=false", "checkpoint.every_steps=0"]


def train(out: Path, nproc: int, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "dtrain", "train", RECIPE, *QUIET, f"output_dir={out}", *overrides]
    if nproc > 1:
        cmd[4:4] = ["--nproc-per-node", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def distillation(root: Path, args: argparse.Namespace) -> None:
    steps, seeds = [int(s) for s in args.steps.split(",")], [int(s) for s in args.seeds.split(",")]
    teacher = train(root / "teacher", args.nproc)
    print(f"teacher: recipe CNN, {teacher['steps']} steps, eval accuracy {teacher['eval']['accuracy']:.4f}\n")
    print("| steps | student alone | distilled | gap (points) |\n|---|---|---|---|")
    for n in steps:
        acc: dict[str, list[float]] = {"alone": [], "distilled": []}
        for seed in seeds:
            base = [*STUDENT, f"train.max_steps={n}", f"seed={seed}"]
            acc["alone"].append(train(root / f"a{n}-{seed}", args.nproc, *base)["eval"]["accuracy"])
            acc["distilled"].append(
                train(root / f"d{n}-{seed}", args.nproc, *base, f"distill.teacher={root / 'teacher'}")["eval"][
                    "accuracy"
                ]
            )
        cell = {k: f"{statistics.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" for k, v in acc.items()}
        gap = 100 * (statistics.mean(acc["distilled"]) - statistics.mean(acc["alone"]))
        print(f"| {n} | {cell['alone']} | {cell['distilled']} | {gap:+.1f} |", flush=True)


def accuracy(run: Path, classes: str) -> float:
    from dtrain.postrun import soup

    return soup.evaluate(str(run), [f"data.classes={classes}"])["accuracy"]


def consolidation(root: Path, args: argparse.Namespace) -> None:
    first, second = "[0,1,2,3,4]", "[5,6,7,8,9]"
    train(root / "first", args.nproc, *STUDENT, f"data.classes={first}", "train.epochs=15")
    rows = [("after 0-4 only", root / "first")]
    train(
        root / "plain",
        args.nproc,
        *STUDENT,
        f"data.classes={second}",
        "train.epochs=8",
        f"model.init_from={root / 'first'}",
    )
    rows.append(("then 5-9, plain fine-tuning", root / "plain"))
    for lam in args.lambdas.split(","):
        train(
            root / f"ewc{lam}",
            args.nproc,
            *STUDENT,
            f"data.classes={second}",
            "train.epochs=8",
            f"ewc.from={root / 'first'}",
            f"ewc.lambda={lam}",
        )
        rows.append((f"then 5-9, ewc.lambda={lam}", root / f"ewc{lam}"))
    print("\n| model | accuracy on 0-4 | accuracy on 5-9 |\n|---|---|---|")
    for name, run in rows:
        print(f"| {name} | {accuracy(run, first):.3f} | {accuracy(run, second):.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["distill", "ewc"], default="")
    p.add_argument("--steps", default="44,88,176")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lambdas", default="1,10,100")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    print(f"{args.nproc} ranks, {platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "ewc":
            distillation(Path(tmp), args)
        if args.only != "distill":
            consolidation(Path(tmp), args)


if __name__ == "__main__":
    main()
