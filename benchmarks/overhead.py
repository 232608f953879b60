"""Platform overhead, measured side by side: dtrain vs a plain PyTorch loop (same model, data,
optimizer, schedule, clipping), 1 process and 2 DDP ranks, with MLflow tracking off and on.

    python benchmarks/overhead.py [--steps 300] [--rounds 5] [--nprocs 1,2]

Runs alternate (plain, plain with dtrain's malloc thresholds, dtrain, dtrain+tracking) for
--rounds rounds so that drift of a shared machine hits all alike; the medians of
steady-state samples/s are compared. dtrain fixes glibc's malloc thresholds on start
(dtrain/allocator.py); the second plain column gives the plain loop the same setting, so
"dtrain / plain (same malloc)" is the platform's own cost. Prints a Markdown table.
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

from dtrain.runtime.launch import torchrun_launcher

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def launch(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [PY, *args]
    return [*torchrun_launcher(nproc), *args]


def run(cmd: list[str], cwd: Path, **extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **extra}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return out.stdout


def plain(nproc: int, steps: int, cwd: Path, same_malloc: bool = False) -> float:
    from dtrain.runtime.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    out = run(
        launch(nproc, [str(ROOT / "benchmarks" / "plain_loop.py"), f"--steps={steps}", "--batch=64"]),
        cwd,
        **(env if same_malloc else {}),
    )
    return json.loads(out.strip().splitlines()[-1])["throughput"]


def dtrain(nproc: int, steps: int, cwd: Path, tracking: bool) -> float:
    out_dir = cwd / f"dtrain-{nproc}-{tracking}"
    overrides = [
        f"train.max_steps={steps}",
        "data.global_batch_size=64",
        "data.augment=false",
        "model.sync_bn=false",
        "train.eval_every_steps=1000000",
        "checkpoint.every_steps=0",
        "checkpoint.overwrite=true",
        f"output_dir={out_dir}",
        f"tracking.enabled={str(tracking).lower()}",
        f"tracking.uri=sqlite:///{cwd}/mlflow.db",
        "tracking.experiment=overhead",
    ]
    run(launch(nproc, ["-m", "dtrain", "train", str(ROOT / "recipes" / "cnn_digits.yaml"), *overrides]), cwd)
    return json.loads((out_dir / "summary.json").read_text())["throughput"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--nprocs", default="1,2")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        for nproc in map(int, args.nprocs.split(",")):
            got = {"plain": [], "plain+malloc": [], "dtrain": [], "dtrain+mlflow": []}
            for r in range(args.rounds):
                got["plain"].append(plain(nproc, args.steps, cwd))
                got["plain+malloc"].append(plain(nproc, args.steps, cwd, same_malloc=True))
                got["dtrain"].append(dtrain(nproc, args.steps, cwd, tracking=False))
                got["dtrain+mlflow"].append(dtrain(nproc, args.steps, cwd, tracking=True))
                print(
                    f"nproc {nproc} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in got.items()),
                    file=sys.stderr,
                )
            med = {k: statistics.median(v) for k, v in got.items()}
            rows.append((nproc, med))
    print(
        f"\nSteady-state samples/s, CNN digits, global batch 64, {args.steps} steps, median of {args.rounds} rounds; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n"
    )
    print(
        "| ranks | plain loop | plain loop, same malloc | dtrain | dtrain + MLflow | dtrain / plain | "
        "dtrain / plain (same malloc) | MLflow on / off |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for nproc, m in rows:
        print(
            f"| {nproc} | {m['plain']:.0f} | {m['plain+malloc']:.0f} | {m['dtrain']:.0f} | {m['dtrain+mlflow']:.0f} | "
            f"{m['dtrain'] / m['plain']:.3f} | {m['dtrain'] / m['plain+malloc']:.3f} | "
            f"{m['dtrain+mlflow'] / m['dtrain']:.3f} |"
        )


if __name__ == "__main__":
    main()
