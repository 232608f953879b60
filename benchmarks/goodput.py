"""Goodput under failures, measured side by side: one 2-rank job under `torchrun --max-restarts`,
its workers SIGKILLed at times drawn from an exponential distribution (a seeded mean time
between failures), run with fixed checkpoint intervals and with `checkpoint.every_steps=auto`.

    python benchmarks/goodput.py [--mtbf 30] [--steps 300] [--factors 0.25,1,4] [--seed 0]

Every run meets the same failure times (common random numbers: the k-th SIGKILL comes at the
same second of every run's wall clock), so the runs differ only in their interval. A first,
failure-free run measures what the model needs: δ (the seconds a checkpoint blocks training),
the step time and the restart time R; the fixed intervals are Young/Daly's τ = sqrt(2 δ M)
times each factor. For each run it prints the measured goodput (dtrain's own accounting,
summary.json's `goodput`) and the model's prediction given the failures that run met:

    wall = startup + N s + (N / n) δ + evaluation + F (R + D + (n s + δ) / 2)
    goodput = N s / wall

(N steps of s seconds, a checkpoint every n steps, F failures each costing a restart R, the
downtime D before it and on average half an interval of redone work). A run that lasts longer
meets more of the schedule's failures, so each row also gives its goodput at exactly the mean
failure rate (its measured parts, failures at their measured mean cost, wall / M of them).
Prints Markdown tables, the second the failure arithmetic at 1,024 and 16,384 GPUs with the
measured checkpoint and restart times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from dtrain.runtime.launch import torchrun_launcher

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "transformer_charlm.yaml")
# A 7M-parameter Transformer with AdamW: an 85 MB checkpoint, steps of ~0.1 s on 2 CPU ranks.
MODEL = [
    "model.n_layer=4",
    "model.n_embd=384",
    "model.n_head=6",
    "model.block_size=64",
    "data.global_batch_size=16",
    "data.max_chars=300000",
    "train.eval_every_steps=0",
    "tracking.enabled=false",
    "tracking.log_every=10",
    "optim.warmup_steps=20",
    "data.eval_blocks=32",
]


def workers(agent: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in agent.children(recursive=True) if "dtrain" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def run(
    out: Path, interval: str, steps: int, mtbf_s: float, kills: list[float], restarts: int, extra: list[str] = ()
) -> dict:
    """One job; SIGKILLs a random worker at each of `kills` (seconds after launch)."""
    cmd = [
        *torchrun_launcher(2, restarts),
        "-m",
        "dtrain",
        "train",
        RECIPE,
        *MODEL,
        f"train.max_steps={steps}",
        f"checkpoint.every_steps={interval}",
        f"checkpoint.mtbf_hours={mtbf_s / 3600}",
        "resume=auto",
        f"output_dir={out}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent)
    agent, done, killed = psutil.Process(proc.pid), threading.Event(), []
    pick = random.Random(1)

    def killer() -> None:
        for at in kills:
            if done.wait(max(0.0, t0 + at - time.time())):
                return
            victims = workers(agent)
            if victims:  # none while the agent restarts them: that failure falls in a restart
                pick.choice(victims).send_signal(signal.SIGKILL)
                killed.append(round(time.time() - t0, 1))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    done.set()
    if proc.returncode:
        sys.exit(f"failed ({interval}): {stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    auto = [line for line in stdout.splitlines() if line.startswith("checkpoint.every_steps=auto")]
    return {"wall": time.time() - t0, "kills": killed, "goodput": summary["goodput"], "auto": auto}


def predict(g: dict, steps: int, n: float, delta: float, step: float, restart: float, downtime: float) -> float:
    """The model's goodput for the failures this run met (module docstring)."""
    failures = g["attempts"] - 1
    wall = (
        g["by_attempt"][0]["to_first_step_s"]
        + steps * step
        + steps / n * delta
        + g["eval_s"]
        + failures * (restart + downtime + (n * step + delta) / 2)
    )
    return steps * step / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mtbf", type=float, default=30.0, help="mean seconds between SIGKILLs")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--factors", default="0.25,1,4", help="fixed intervals as multiples of Young/Daly's tau")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dtrain-goodput-"))

    # Calibration, no failures: δ, step time and startup from the ledger of a run with checkpoints
    # (and δ of the same checkpoints written in the background, for the arithmetic at the end).
    (a,) = run(tmp / "calibrate", "20", 100, args.mtbf, [], 0)["goodput"]["by_attempt"]
    (b,) = run(tmp / "calibrate-async", "20", 100, args.mtbf, [], 0, ["checkpoint.async=true"])["goodput"]["by_attempt"]
    delta, step = a["checkpoint_s"] / a["checkpoints"], a["step_s"] / a["steps"]
    delta_async = b["checkpoint_s"] / b["checkpoints"]
    tau = math.sqrt(2 * delta * args.mtbf)
    print(
        f"calibration: checkpoint {delta:.3f}s, step {step:.3f}s, startup {a['to_first_step_s']:.1f}s; "
        f"Young/Daly tau = sqrt(2 x {delta:.3f} x {args.mtbf:g}) = {tau:.2f}s = {tau / step:.0f} steps; "
        f"checkpoint.async: {delta_async:.3f}s blocking",
        flush=True,
    )

    rng = random.Random(args.seed)
    kills, t = [], 0.0
    while t < 3600:
        t += rng.expovariate(1 / args.mtbf)
        kills.append(t)
    intervals = [str(max(1, round(f * tau / step))) for f in map(float, args.factors.split(","))] + ["auto"]
    rows = []
    for interval in intervals:
        r = run(tmp / f"every-{interval}", interval, args.steps, args.mtbf, kills, restarts=100)
        g = r["goodput"]
        later = g["by_attempt"][1:]
        restart = sum(x["to_first_step_s"] for x in later) / len(later) if later else a["to_first_step_s"]
        downtime = g["downtime_s"] / len(later) if later else 0.0
        n = (
            float(interval)
            if interval != "auto"
            else (float(r["auto"][-1].split("every ")[1].split(" ")[0]) if r["auto"] else args.steps)
        )
        rows.append((interval, n, len(r["kills"]), g, predict(g, args.steps, n, delta, step, restart, downtime)))
        print(
            f"every {interval}: goodput {g['goodput']:.3f}, {len(r['kills'])} kills, {g['attempts']} attempts",
            flush=True,
        )

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"2 gloo ranks, {args.steps} steps; SIGKILL every {args.mtbf:g}s on average (seed {args.seed}); "
        f"checkpoint {delta:.3f}s, step {step:.3f}s, tau {tau:.2f}s\n"
    )
    print(
        "| checkpoint.every_steps | interval | kills | attempts | wall s | productive s | redone s | "
        "restarts s | downtime s | checkpoints s | goodput | model | goodput at 1/M |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for interval, n, kills_, g, model in rows:
        print(
            f"| {interval} | {n:.0f} steps = {n * step:.1f}s | {kills_} | {g['attempts']} | {g['wall_s']:.1f} | "
            f"{g['productive_s']:.1f} | {g['lost_s']:.1f} | {g['restart_s']:.1f} | {g['downtime_s']:.1f} | "
            f"{g['checkpoint_s']:.1f} | {g['goodput']:.3f} | {model:.3f} | {at_rate(g, args.mtbf):.3f} |"
        )
    restarts = [a for _, _, _, g, _ in rows for a in g["by_attempt"][1:]]
    restart = sum(a["to_first_step_s"] for a in restarts) / max(1, len(restarts))
    downtime = sum(g["downtime_s"] for _, _, _, g, _ in rows) / max(1, len(restarts))
    arithmetic(delta, delta_async, restart + downtime)


def at_rate(g: dict, mtbf_s: float) -> float:
    """The run's goodput had it met failures at exactly the mean rate 1/M: its measured parts,
    with the failures' mean cost (restart, downtime, redone work) paid wall / M times. A run
    that met more or fewer failures than its length makes likely is put on an equal footing."""
    failures = g["attempts"] - 1
    if not failures:
        return g["goodput"]
    per_failure = (g["restart_s"] + g["downtime_s"] + g["lost_s"]) / failures
    free = g["wall_s"] - failures * per_failure  # the wall time without failures
    return g["productive_s"] / (free / max(1e-9, 1 - per_failure / mtbf_s))


def arithmetic(delta: float, delta_async: float, restart: float) -> None:
    """Young/Daly at scale with this machine's δ and restart time: a node (8 GPUs) fails every
    NODE_MTBF_HOURS; the job's MTBF is that over its nodes."""
    from dtrain.features.goodput import NODE_MTBF_HOURS, Interval

    print(
        f"\nAt scale, with these measured costs (checkpoint {delta:.2f}s, async {delta_async:.3f}s blocking; restart "
        f"{restart:.1f}s) and a node MTBF of {NODE_MTBF_HOURS:g} h:\n"
    )
    print("| GPUs | job MTBF | checkpoint | restart | tau | expected loss | goodput |")
    print("|---|---|---|---|---|---|---|")
    for gpus in (1024, 16384):
        mtbf_s = NODE_MTBF_HOURS * 3600 / (gpus // 8)
        for name, d in (("blocking", delta), ("async", delta_async)):
            for r in (restart, 600.0):
                i = Interval(mtbf_s, delta_s=d)
                print(
                    f"| {gpus:,} | {mtbf_s / 3600:.1f} h | {name} {d:.2f}s | {r:.0f}s | {i.tau():.0f}s | "
                    f"{i.expected_loss(r):.2%} | {1 - i.expected_loss(r):.2%} |"
                )


if __name__ == "__main__":
    main()
