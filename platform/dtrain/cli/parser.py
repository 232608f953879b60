"""`dtrain` command line: only the parsing. Each subcommand names the function that runs it
(`module:function`, imported when that command runs: `dtrain --version`, `--help` and a bad
command line answer in a fraction of a second, before torch is imported).

Bad input ends with one line on stderr and a non-zero exit, never a traceback: exit 2 for a bad
recipe, override or launch environment, 1 when the work fails (`dtrain.errors`). `train` and
`check` run on ranks (`dtrain.train.job`); the others in this process (`dtrain.cli.commands`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import dtrain
from dtrain.errors import Failure, shown

def _recipe_command(sub: Any, name: str, func: str, help: str, nproc_help: str) -> argparse.ArgumentParser:
    """A subcommand that takes a recipe and overrides, and can start itself under torchrun."""
    t: argparse.ArgumentParser = sub.add_parser(name, help=help)
    t.add_argument("recipe", help="YAML recipe, e.g. recipes/cnn_digits.yaml")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. optim.lr=0.05")
    t.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=0, metavar="N", help=nproc_help)
    # The deepspeed launcher may also put --local_rank after the subcommand; the rank comes from the env.
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(func=func)
    return t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dtrain", description=dtrain.__doc__)
    p.add_argument("--version", action="version", version=f"dtrain {dtrain.__version__}")
    # The deepspeed launcher puts --local_rank=N before the subcommand (`-m dtrain --local_rank=0 train`).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_train_and_check, _search, _compare_and_sweep, _tools):
        add(sub)
    return p


def _train_and_check(sub: Any) -> None:
    t = _recipe_command(sub, "train", "dtrain.cli.train:train", "train a recipe (1 process, or under torchrun / deepspeed / "
                        "accelerate / srun, or as a Ray Train job)",
                        "validate, then run N ranks on this machine via torchrun --standalone")
    t.add_argument("--ray-workers", type=int, default=0, metavar="N", help="run as a Ray Train job of N workers "
                   "(ray.train.torch.TorchTrainer; the ray extra)")
    t.add_argument("--ray-address", default="", help="the Ray cluster to join (e.g. auto); default: a local instance")
    t.add_argument("--ray-max-failures", type=int, default=0, metavar="K", help="worker-group restarts Ray may make "
                   "(FailureConfig.max_failures); each continues from the newest checkpoint")
    t.add_argument("--ray-gpu", action="store_true", help="one GPU per Ray worker (NCCL)")
    k = _recipe_command(sub, "check", "dtrain.cli.check:check_command", "sanity checks before a long run: init loss, overfit a batch, "
                        "batch independence, gradcheck, LR range, data, distributed (exit 1 on a FAIL)",
                        "run on N ranks of this machine via torchrun (the distributed check needs 2 or more)")
    k.add_argument("--only", default="", help="comma-separated check names (default: all but invariance, which "
                   "is asked for alone: --only invariance --nproc-per-node N)")
    k.add_argument("--trace-to", default="", help=argparse.SUPPRESS)  # invariance's own N ranks record here


def _search(sub: Any) -> None:
    q = _recipe_command(sub, "search", "dtrain.cli.commands:search_command", "hyperparameter search with Optuna: trials are dtrain runs, "
                        "MLflow child runs of one parent", "run each trial on N ranks via torchrun")
    q.add_argument("--space", required=True, help="YAML: recipe key -> {type: float|int|categorical, ...}")
    q.add_argument("--trials", type=int, default=10, help="finished (complete or pruned) trials the study needs")
    q.add_argument("--max-failures", type=int, default=3, help="failed trials after which this worker stops, "
                   "exit 1 (default 3; failed trials never count toward --trials)")
    q.add_argument("--stop-grace", type=float, default=60.0, help="seconds a stopped search gives its running "
                   "trial to checkpoint (SIGTERM) before killing it (default 60)")
    q.add_argument("--metric", default="", help="eval metric to optimise (default: the task's headline "
                   "metric, e.g. eval/accuracy for cnn, eval/loss for transformer)")
    q.add_argument("--direction", choices=["maximize", "minimize"], default=None)
    q.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe")
    q.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    q.add_argument("--prune-startup", type=int, default=3, help="completed trials before the median pruner "
                   "prunes any (default 3)")
    q.add_argument("--prune-warmup", type=int, default=1, help="a trial's first evaluations that never prune "
                   "it (default 1)")
    q.add_argument("--storage", default="", help="Optuna storage URL (default: optuna.db beside the MLflow "
                   "store; postgresql+psycopg://... for several machines)")
    q.add_argument("--study", default="", help="study name (default RECIPE-search); the same name continues it")
    q.add_argument("--output", default="", help="folder for trials, search.json, best.yaml, plots")


def _compare_and_sweep(sub: Any) -> None:
    def compare_options(c: argparse.ArgumentParser) -> None:
        c.add_argument("--metric", default="eval/accuracy", help="eval metric to compare (default eval/accuracy)")
        c.add_argument("--tolerance", type=float, default=0.01,
                       help="how much worse than the baseline a final metric may be (default 0.01 = 1 point)")
        c.add_argument("--target", type=float, default=None,
                       help="metric value for 'time to target' (default: baseline final minus the tolerance)")
        c.add_argument("--fail-on-gap", action="store_true", help="exit 1 when a run is outside the tolerance")

    c = sub.add_parser("compare", help="single- vs multi-GPU convergence, read back from MLflow")
    c.add_argument("--experiment", help="MLflow experiment whose runs to compare")
    c.add_argument("--runs", nargs="+", help="compare exactly these run ids")
    c.add_argument("--uri", default="", help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    c.add_argument("--output", required=True, help="folder for comparison.png and comparison.json")
    compare_options(c)
    c.set_defaults(func="dtrain.cli.commands:compare_command")

    w = sub.add_parser("sweep-world-sizes", help="train a recipe at several world sizes via torchrun, then compare")
    w.add_argument("recipe")
    w.add_argument("overrides", nargs="*")
    w.add_argument("--world-sizes", default="1,2", help="comma-separated rank counts (default 1,2)")
    w.add_argument("--keep", choices=["global", "per-rank"], default="global",
                   help="keep the recipe's global batch (strong scaling, default) or its per-rank batch at the "
                        "smallest world size (weak scaling: the global batch and the LR grow with the ranks)")
    w.add_argument("--output", default="", help="comparison folder (default OUTPUT_DIR/comparison)")
    compare_options(w)
    w.set_defaults(func="dtrain.cli.commands:sweep_command")


def _tools(sub: Any) -> None:
    k = sub.add_parser("keys", help="every key of a recipe's task: value, type, default, what it does")
    k.add_argument("recipe")
    k.add_argument("overrides", nargs="*")
    k.add_argument("--changed", action="store_true", help="only the keys the recipe sets to a non-default value")
    k.set_defaults(func="dtrain.cli.commands:keys_command")

    a = sub.add_parser("average", help="average checkpoints of one run into a plain model.pt")
    a.add_argument("checkpoints", nargs="+", help="step_* checkpoint folders of one run")
    a.add_argument("--output", required=True, help="the averaged state_dict: a .safetensors file, or a model.pt")
    a.add_argument("--bn-batches", type=int, default=100,
                   help="training batches to recompute BatchNorm statistics on (0: keep the averaged ones)")
    a.add_argument("--trust", action="store_true", help="the run folder is yours: import a task module found in "
                   "it, and read DeepSpeed checkpoints (which unpickle)")
    a.set_defaults(func="dtrain.cli.commands:average_command")

    _combining(sub)

    t = sub.add_parser("prepare-text", help="encode text files into train.bin / val.bin for data.tokens")
    t.add_argument("inputs", nargs="+", help="text files or folders (their text files, in sorted order)")
    t.add_argument("--output", required=True, help="the token folder (train.bin, val.bin, meta.json)")
    t.add_argument("--val-fraction", type=float, default=0.1, help="the last part of the text held out")
    t.add_argument("--max-chars", type=int, default=0, help="stop after this many characters (0: all)")
    t.add_argument("--tokenizer", default="", help="a Hugging Face tokenizer saved locally (folder or tokenizer.json) "
                   "to encode with, instead of a character vocabulary (the hf extra)")
    t.set_defaults(func="dtrain.cli.commands:prepare_text_command")

    p = sub.add_parser("predict", help="a finished run's predictions for a .npy of inputs")
    p.add_argument("run", help="the run's output_dir (config.yaml, model.safetensors, preprocessing.safetensors)")
    p.add_argument("inputs", help="a .npy array (N, ...) of raw inputs, as the task's predict() documents")
    p.add_argument("--output", required=True, help="where the .npy of outputs goes (e.g. class probabilities)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--trust", action="store_true", help="the run folder is yours: import a task module found in it")
    p.set_defaults(func="dtrain.cli.commands:predict_command")

    s = sub.add_parser("sample", help="generate text from a trained transformer run")
    s.add_argument("run", help="the run's output_dir (holds config.yaml, model.pt, vocab.json)")
    s.add_argument("--prompt", default="def ", help="text to continue")
    s.add_argument("--tokens", type=int, default=300, help="characters to generate")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--trust", action="store_true", help="the run folder is yours: import a task module found in it")
    s.set_defaults(func="dtrain.cli.commands:sample_command")


def _combining(sub: Any) -> None:
    def common(p: argparse.ArgumentParser, func: str, output: str, mixes: bool = True) -> None:
        if mixes:
            p.add_argument("--output", required=True, help=output)
            p.add_argument("--bn-batches", type=int, default=100, help="training batches to recompute BatchNorm "
                           "statistics on for a mixed model (0: mix them too)")
        p.add_argument("--trust", action="store_true", help="the run folders are yours: import a task module found "
                       "in them, read DeepSpeed checkpoints")
        p.set_defaults(func=f"dtrain.cli.commands:{func}")

    s = sub.add_parser("soup", help="combine runs fine-tuned from one start by averaging their weights")
    s.add_argument("runs", nargs="+", help="finished runs' output_dirs or step_* checkpoint folders (one architecture)")
    s.add_argument("--method", choices=["uniform", "greedy", "weighted"], default="greedy",
                   help="uniform mean; greedy: add a run only if the held-out score does not drop (default); "
                        "weighted: by training-set size (FedAvg) or --weights")
    s.add_argument("--weights", default="", help="comma-separated weights for --method weighted")
    common(s, "soup_command", "the soup's run folder (model.safetensors, config.yaml, soup.json)")
    i = sub.add_parser("interpolate", help="evaluate the weights on the line between two runs (do they share a basin?)")
    i.add_argument("a")
    i.add_argument("b")
    i.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="comma-separated, 0: A, 1: B")
    common(i, "interpolate_command", "folder for interpolation.json and interpolation.png")
    e = sub.add_parser("evaluate", help="a run's model on its task's held-out set, the recipe changed by overrides")
    e.add_argument("run", help="a finished run's output_dir or a step_* checkpoint folder")
    e.add_argument("overrides", nargs="*", help="e.g. data.classes=[0,1,2,3,4] (an earlier task's data)")
    common(e, "evaluate_command", "", mixes=False)


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`train r.yaml --nproc-per-node 2 optim.lr=0.1`).
    unknown = [x for x in extra if "=" not in x or x.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "ray_workers", 0):  # train as a Ray Train job: this process only submits it
        args.func = "dtrain.train.ray_job:launch"
    module, name = args.func.split(":")
    func = getattr(importlib.import_module(module), name)
    try:
        # @record writes an unexpected exception of this rank to torchrun's error file, so the
        # agent's failure summary shows the failing rank's traceback rather than "exitcode 1".
        record(func)(args)
    except Failure as e:
        print(shown(str(e)), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
