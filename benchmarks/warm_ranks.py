"""What a short test job costs with fresh interpreters and with the suite's warm ranks
(tests/support/warm.py), side by side: the CNN recipe for 1 step, 1 process and 2 ranks,
rounds alternating so that a shared machine's drift hits both alike.

    python benchmarks/warm_ranks.py [--rounds 3]

Prints a Markdown table of medians: wall seconds, and for fresh interpreters the CPU seconds
of the processes the job started (torchrun's agent and its ranks; a warm job's ranks are the
zygotes' children, not this process's, so only their wall time is shown).
"""

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from helpers import CNN, TINY_CNN, run_dtrain  # noqa: E402


def one(nproc: int, warm: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        args = ["train", CNN, *TINY_CNN, "train.max_steps=1", f"output_dir={tmp}/out"]
        proc = run_dtrain(args, Path(tmp), nproc=nproc, warm=warm)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    one(2, warm=True)  # start the zygotes (once per pytest worker in the suite)
    walls: dict[tuple[int, bool], list[float]] = {}
    cpu: dict[tuple[int, bool], list[float]] = {}
    for _ in range(a.rounds):
        for key in [(0, False), (0, True), (2, False), (2, True)]:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            walls.setdefault(key, []).append(one(*key))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if not key[1]:  # a fresh job's processes are this process's children, reaped here
                cpu.setdefault(key, []).append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, medians of {a.rounds} rounds\n")
    print("| job | fresh interpreters: wall | fresh: CPU | warm: wall |")
    print("|---|---|---|---|")
    for nproc, name in [(0, "1 process"), (2, "2 ranks")]:
        fresh, warm = statistics.median(walls[(nproc, False)]), statistics.median(walls[(nproc, True)])
        print(f"| {name} | {fresh:.1f} s | {statistics.median(cpu[(nproc, False)]):.1f} s | {warm:.2f} s |")


if __name__ == "__main__":
    main()
