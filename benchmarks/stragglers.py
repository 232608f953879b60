"""What straggler detection costs while nothing is slow: the digits CNN on 2 ranks (400 steps,
evaluation and checkpoints off) with `stragglers.every_steps` 0 (off), 100 (the default) and 1
(a comparison after every step: the most it can cost), side by side in one run; samples/s
from each run's summary.json (steady state, after the first steps). Repeated `--repeats`
times, interleaved, so that the machine's drift hits every setting alike. Also the cost of
one reading of the thread's counters (`dtrain.features.stragglers.thread_times`).

    python benchmarks/stragglers.py [--repeats 3]
"""

import argparse
import statistics
import subprocess
import time

import torch
from instrumentation import ROOT, side_by_side  # the same interleaved runs, on 2 ranks here

from dtrain.features.stragglers import thread_times

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rates = side_by_side(SETTINGS, args.repeats, COMMON, nproc=2)
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
