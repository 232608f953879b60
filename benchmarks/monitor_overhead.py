"""What `monitor.every` costs: the digits CNN (1 process, 300 steps, evaluation and checkpoints
off) with the monitor off, every 10 steps and every step, side by side in one run; samples/s
from each run's summary.json (steady state, after the first steps). Repeated `--repeats` times,
interleaved, so that the machine's drift hits every setting alike.

    python benchmarks/monitor_overhead.py [--repeats 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import run_dtrain  # noqa: E402  (the tests' launcher)

COMMON = ["tracking.enabled=false", "train.max_steps=300", "train.eval_every_steps=1000000", "checkpoint.every_steps=0",
          "data.augment=false"]
SETTINGS = {"off": "monitor.every=0", "every 10 steps": "monitor.every=10", "every step": "monitor.every=1"}


def throughput(root: Path, name: str, setting: str) -> float:
    out = root / name
    proc = run_dtrain(["train", str(ROOT / "recipes" / "cnn_digits.yaml"), *COMMON, setting, f"output_dir={out}",
                       "checkpoint.overwrite=true"], cwd=root)
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
            for label, setting in SETTINGS.items():
                rates[label].append(throughput(Path(tmp), f"{i}-{setting}", setting))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"commit {commit.stdout.strip()}, torch {torch.__version__}, {args.repeats} repeats, median samples/s")
    base = statistics.median(rates["off"])
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"monitor {label:>14}: {rate:8.0f} samples/s  ({rate / base:.3f} x off)")


if __name__ == "__main__":
    main()
