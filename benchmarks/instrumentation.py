"""What `monitor.every` and `profile.enabled` cost: the digits CNN (1 process, 300 steps,
evaluation and checkpoints off) with both off, the monitor every 10 steps and every step, and
the profiler recording 5 steps, side by side in one run; samples/s from each run's
summary.json (steady state, after the first steps). Repeated `--repeats` times, interleaved,
so that the machine's drift hits every setting alike. Also the cost of a profiling region
when the profiler is off (`dtrain.runtime.timing.region`, entered 4 times per step).

    python benchmarks/instrumentation.py [--repeats 3]
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

from dtrain.runtime.timing import region

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from helpers import run_dtrain  # noqa: E402  (the tests' launcher)

COMMON = [
    "tracking.enabled=false",
    "train.max_steps=300",
    "train.eval_every_steps=1000000",
    "checkpoint.every_steps=0",
    "data.augment=false",
]
SETTINGS = {
    "off": ["monitor.every=0"],
    "monitor every 10 steps": ["monitor.every=10"],
    "monitor every step": ["monitor.every=1"],
    "profile 5 of 300 steps": ["profile.enabled=true", "profile.wait=100", "profile.active=5"],
}


def throughput(root: Path, name: str, setting: list[str], common: list[str] = COMMON, nproc: int = 0) -> float:
    """samples/s (summary.json's steady state) of the digits CNN with `common` and `setting`."""
    out = root / name
    recipe = str(ROOT / "recipes" / "cnn_digits.yaml")
    args = ["train", recipe, *common, *setting, f"output_dir={out}", "checkpoint.overwrite=true"]
    proc = run_dtrain(args, cwd=root, nproc=nproc)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return float(json.loads((out / "summary.json").read_text())["throughput"])


def side_by_side(
    settings: dict[str, list[str]], repeats: int, common: list[str] = COMMON, nproc: int = 0
) -> dict[str, list[float]]:
    """Each setting's samples/s, `repeats` times, interleaved: the machine's drift hits all alike."""
    rates: dict[str, list[float]] = {k: [] for k in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for n, (label, setting) in enumerate(settings.items()):
                rates[label].append(throughput(Path(tmp), f"{i}-{n}", setting, common, nproc))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rates = side_by_side(SETTINGS, args.repeats)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"commit {commit.stdout.strip()}, torch {torch.__version__}, {args.repeats} repeats, median samples/s")
    base = statistics.median(rates["off"])
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"{label:>24}: {rate:8.0f} samples/s  ({rate / base:.3f} x off)")
    n = 1_000_000
    t0 = time.perf_counter()
    for _ in range(n):
        with region("forward"):
            pass
    print(f"a profiling region with the profiler off: {(time.perf_counter() - t0) / n * 1e9:.0f} ns")


if __name__ == "__main__":
    main()
