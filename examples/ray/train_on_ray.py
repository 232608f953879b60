"""A dtrain recipe as a Ray Train job from a script of your own: the same as
`dtrain train RECIPE --ray-workers N`, with the TorchTrainer in your hands (add Ray callbacks,
a different ScalingConfig, or run it inside a larger Ray program).

    pip install -e ".[ray]"
    python examples/ray/train_on_ray.py recipes/cnn_digits.yaml --workers 2 --max-failures 1 train.epochs=2

On a cluster (KubeRay's RayJob, Anyscale), `--address auto` joins the running cluster, and
output_dir must be on storage every node reaches: it is the Ray run's storage path.
"""

from __future__ import annotations

import argparse
import sys

from dtrain.errors import Failure
from dtrain.train import ray_job


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, as for dtrain train")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-failures", type=int, default=1, help="worker-group restarts Ray may make")
    p.add_argument("--address", default="", help="a running Ray cluster (auto); default: start one here")
    args = p.parse_intermixed_args()  # options before, among or after the overrides, as the docstring shows
    try:
        trainer = ray_job.trainer(
            args.recipe, args.overrides, args.workers, max_failures=args.max_failures, address=args.address
        )
    except Failure as e:  # bad input (a key, --address): one line and exit 2, as dtrain's own commands do
        print(f"dtrain: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    try:
        result = trainer.fit()  # raises if the job still fails after --max-failures restarts
    except Exception:
        ray_job.close_left_running(args.recipe, args.overrides)  # Ray stopped the workers before rank 0 could
        raise
    print(f"ray: done; the run folder is {result.path}")


if __name__ == "__main__":
    main()
