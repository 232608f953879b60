"""What a lost host costs at 1,000 nodes, from the bounds measured across network namespaces
(tests/runtime/test_hosts.py, printed by `pytest -s tests/runtime/test_hosts.py`): the time to
notice a lost or frozen host (train.collective_timeout_s + the 10 s monitored barrier that names
it) plus the restart, in Young/Daly's arithmetic (dtrain.features.goodput.Interval).

    python benchmarks/hosts_at_scale.py [--nodes 1000] [--timeout-s 8] [--restart-s 3.5]
        [--checkpoint-s 30] [--node-mtbf-hours 6000]

Prints one Markdown row per collective timeout: the job's MTBF, Young/Daly's interval and the
expected fraction of wall time lost to checkpoints, detection, restarts and redone work.
"""

from __future__ import annotations

import argparse

from dtrain.features.goodput import Interval

MONITOR_S = 10.0  # dtrain.runtime.distributed.stuck_ranks: the barrier that names the missing rank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--timeouts-s", default="8,60,600", help="train.collective_timeout_s values, comma-separated")
    p.add_argument("--restart-s", type=float, default=3.5, help="measured: the goodput line's restarts")
    p.add_argument("--checkpoint-s", type=float, default=30.0, help="seconds a checkpoint blocks training")
    p.add_argument("--node-mtbf-hours", type=float, default=6000.0)
    a = p.parse_args()
    mtbf_s = a.node_mtbf_hours * 3600 / a.nodes
    print(f"{a.nodes} nodes, node MTBF {a.node_mtbf_hours:g} h: job MTBF {mtbf_s / 3600:.1f} h; "
          f"checkpoint {a.checkpoint_s:g} s, restart {a.restart_s:g} s\n")  # fmt: skip
    print("| collective timeout | to notice + restart | Young/Daly interval | expected loss |")
    print("|---|---|---|---|")
    for timeout in (float(t) for t in a.timeouts_s.split(",")):
        interval = Interval(mtbf_s=mtbf_s, delta_s=a.checkpoint_s)
        recover = timeout + MONITOR_S + a.restart_s
        print(f"| {timeout:g} s | {recover:.1f} s | {interval.tau() / 60:.1f} min | "
              f"{interval.expected_loss(recover):.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
