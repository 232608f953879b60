"""What straggler detection costs while nothing is slow: the digits CNN on 2 ranks (400 steps,
evaluation and checkpoints off) with `stragglers.every_steps` 0 (off), 100 (the default) and 1
(a comparison after every step: the most it can cost), side by side in one run; samples/s
from each run's summary.json (steady state, after the first steps). Repeated `--repeats`
times, interleaved, so that the machine's drift hits every setting alike. Also the cost of
one reading of the thread's counters (`dtrain.features.stragglers.thread_times`).

    python benchmarks/stragglers.py [--repeats 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dtrain.features.stragglers import thread_times

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from helpers import run_dtrain  # noqa: E402  (the tests' launcher)

COMMON = [
    "tracking.enabled=false",
    "train.max_steps=400",
    "train.eval_every_steps=1000000",
    "checkpoint.every_steps=0",
    "data.augment=false",
]
SETTINGS = {
    "off": ["stragglers.every_steps=0"],
    "every 100 steps (default)": [],
    "every step": ["stragglers.every_steps=1"],
}


def throughput(root: Path, name: str, setting: list[str]) -> float:
    out = root / name
    recipe = str(ROOT / "recipes" / "cnn_digits.yaml")
    proc = run_dtrain(["train", recipe, *COMMON, *setting, f"output_dir={out}"], cwd=root, nproc=2)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return float(json.loads((out / "summary.json").read_text())["throughput"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {k: [] for k in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for n, (label, setting) in enumerate(SETTINGS.items()):
                rates[label].append(throughput(Path(tmp), f"{i}-{n}", setting))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"commit {commit.stdout.strip()}, torch {torch.__version__}, 2 ranks, {args.repeats} repeats, median")
    base = statistics.median(rates["off"])
    for label, values in rates.items():
        rate = statistics.median(values)
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"{label:>26}: {rate:6.0f} samples/s  ({rate / base:.3f} x off; runs {runs})")
    n = 100_000
    t0 = time.perf_counter()
    for _ in range(n):
        thread_times()
    print(f"one reading of the thread's counters: {(time.perf_counter() - t0) / n * 1e6:.1f} us")


if __name__ == "__main__":
    main()
