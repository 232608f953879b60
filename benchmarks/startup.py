"""Start-up and exit cost of MLflow tracking, measured side by side: the CNN recipe for 2 steps,
1 process, tracking off vs on (an existing SQLite store), rounds alternating so that a shared
machine's drift hits both alike.

    python benchmarks/startup.py [--rounds 5]

For each run: seconds from launch to the first step's line, and to exit. Prints a Markdown table
of medians and the difference tracking makes.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["train.max_steps=2", "tracking.log_every=1", "train.eval_every_steps=0", "checkpoint.every_steps=0"]


def one(tracking: list[str], out: Path) -> tuple[float, float]:
    """(seconds to the line of step 1, seconds to exit) of one run."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dtrain",
            "train",
            str(ROOT / "recipes" / "cnn_digits.yaml"),
            *ARGS,
            *tracking,
            f"output_dir={out}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=out.parent,
    )
    first = float("nan")
    for line in proc.stdout:
        if line.startswith("step 1/"):
            first = time.perf_counter() - t0
    if proc.wait():
        sys.exit(f"a run failed (exit {proc.returncode})")
    return first, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root}/mlflow.db"
        one([f"tracking.uri={uri}"], root / "create-the-store")  # the store exists from here on
        kinds = {"tracking off": ["tracking.enabled=false"], "tracking on": [f"tracking.uri={uri}"]}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        for r in range(a.rounds):
            for kind, extra in kinds.items():
                times[kind].append(one(extra, root / f"{kind.replace(' ', '-')}-{r}"))
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    print(f"{platform.node()}, {os.cpu_count()} CPUs, {a.rounds} rounds, medians\n")
    print("| | to the first step (s) | to exit (s) |\n|---|---|---|")
    for kind, (first, end) in med.items():
        print(f"| {kind} | {first:.2f} | {end:.2f} |")
    off, on = med["tracking off"], med["tracking on"]
    print(f"| tracking's cost | {on[0] - off[0]:+.2f} | {on[1] - off[1]:+.2f} |")


if __name__ == "__main__":
    main()
