"""The README's world-size-invariance figures, printed: the digits CNN for 30 steps at global
batch 64 on 1 rank, on 2 ranks x 32 with SyncBN, and on 2 ranks x 32 without it (what SyncBN
guards against); the max absolute parameter difference to the 1-rank run.

    python benchmarks/invariance.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from helpers import max_param_diff, run_dtrain  # noqa: E402  (the tests' launcher: the CLI's torchrun builder)

COMMON = [
    "tracking.enabled=false",
    "train.max_steps=30",
    "data.augment=false",
    "checkpoint.every_steps=0",
    "train.eval_every_steps=0",
    "data.global_batch_size=64",
]


def train(root: Path, name: str, nproc: int, *overrides: str) -> dict[str, torch.Tensor]:
    proc = run_dtrain(
        ["train", str(ROOT / "recipes" / "cnn_digits.yaml"), *COMMON, f"output_dir={root / name}", *overrides],
        cwd=root,
        nproc=nproc,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return torch.load(root / name / "model.pt", weights_only=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one = train(root, "1x64", 0)
        sync = train(root, "2x32-syncbn", 2, "model.sync_bn=true")
        nosync = train(root, "2x32-nosync", 2, "model.sync_bn=false")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"commit {commit.stdout.strip()}, torch {torch.__version__}")
    print(
        f"2 ranks x 32, SyncBN    vs 1 rank x 64: max |param diff| {max_param_diff(one, sync):.2g} "
        f"(with running statistics {max_param_diff(one, sync, buffers=True):.2g})"
    )
    print(f"2 ranks x 32, no SyncBN vs 1 rank x 64: max |param diff| {max_param_diff(one, nosync):.2g}")


if __name__ == "__main__":
    main()
