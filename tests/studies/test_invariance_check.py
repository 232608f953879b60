"""`dtrain check --only invariance`: the shipped recipes and the guide's example PASS at 2 (and
3) ranks under every engine; user tasks with exactly one reason to differ (tests/planted.py)
are each named as that reason, at the right step and module. The recipes run the real command
(a 1-process reference and N gloo ranks under torchrun); the planted tasks are recorded by the
same functions in two process groups shared by all of them, and compared as the command does."""

import json

import mlflow
import pytest
from helpers import ROOT, mlflow_store, run_dtrain

CNN = str(ROOT / "recipes" / "cnn_digits.yaml")
LM = str(ROOT / "recipes" / "transformer_charlm.yaml")
GAN = str(ROOT / "recipes" / "gan_digits.yaml")
TABULAR = str(ROOT / "examples" / "tabular" / "recipe.yaml")
SMALL_LM = ["model.n_layer=2", "model.n_embd=64", "model.n_head=2", "model.block_size=32"]


def invariance(tmp_path, recipe, *overrides, nproc=2, tracking=False, **env):
    out = tmp_path / "out"
    proc = run_dtrain(
        [
            "check",
            recipe,
            "--only",
            "invariance",
            "--nproc-per-node",
            str(nproc),
            f"output_dir={out}",
            *([] if tracking else ["tracking.enabled=false"]),
            *overrides,
        ],
        cwd=tmp_path,
        **env,
    )
    report = json.loads((out / "check.json").read_text()) if (out / "check.json").exists() else {}
    results = {c["name"]: c for c in report.get("checks", [])}
    return proc, results, report


def passes(proc, results):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert results["invariance"]["verdict"] == "PASS", proc.stdout
    assert all(r["verdict"] == "PASS" for r in results.values()), proc.stdout


# ------------------------------------------------------------------ what must agree does


def test_the_cnn_recipe_agrees_at_two_ranks_and_says_what_it_compared(tmp_path):
    uri = mlflow_store(tmp_path)
    proc, results, report = invariance(tmp_path, CNN, f"tracking.uri={uri}", tracking=True)
    passes(proc, results)
    head = results["invariance"]
    assert "3 step(s), 1 rank x 64 vs 2 ranks x 32, ddp, fp32; tolerance" in head["detail"]
    assert head["value"] < report["invariance"]["tolerance"] / 10  # far inside, not at the edge
    assert set(results) == {
        "invariance",
        *(f"invariance/{p}" for p in ("samples", "lr", "forward", "loss", "grads", "params", "buffers", "determinism")),
    }
    assert (tmp_path / "out" / "check" / "invariance.png").stat().st_size > 0
    assert "the runs agree" in proc.stdout and "s (with process start)" in proc.stdout
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cnn_digits-checks").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["check.invariance"] == "PASS"
    assert run.data.metrics["check/invariance"] == pytest.approx(head["value"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "check")] == ["check/invariance.png"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, overrides, nproc",
    [
        (CNN, ["data.global_batch_size=48"], 3),
        (LM, [*SMALL_LM, "engine=fsdp"], 2),
        (LM, [*SMALL_LM, "engine=deepspeed", "deepspeed.zero_stage=3", "data.grad_accum_steps=2"], 2),
        (GAN, [], 2),
        (TABULAR, ["model.dropout=0"], 2),
    ],
    ids=["cnn-3-ranks", "transformer-fsdp", "transformer-zero3-accum", "gan", "guide-tabular"],
)
def test_shipped_recipes_agree(tmp_path, recipe, overrides, nproc):
    passes(*invariance(tmp_path, recipe, *overrides, nproc=nproc)[:2])


# ------------------------------------------------------------------ each planted cause, named


PLANTED = {
    # task: (overrides, the part that differs first, where, words of the cause, words of the fix)
    "PlainBatchNorm": (
        ["model.sync_bn=false"],
        "forward",
        "model.2",
        "BatchNorm statistics per rank",
        "model.sync_bn=true",
    ),
    "GlobalDropout": ([], "forward", "model.2", "draws from the global RNG", "sample_generator"),
    "GlobalAugmentation": ([], "samples", "", "the same indices give different samples", "sample_generator"),
    "IgnoresSamplerIndex": ([], "samples", "", "not split across ranks", "index it is given"),
    "RoundedPerRank": ([], "samples", "", "differ by rounding only", "the same way everywhere"),
    "PaddedTokens": ([], "loss", "", "mean per rank over unequal counts", "reduce by sums"),
    "RankZeroBuffer": ([], "buffers", "model.2.calls", "differs on rank 1", "all-reduced values"),
    "NondeterministicScatter": ([], "determinism", "model.0", "non-deterministic op", "use_deterministic_algorithms"),
}


def _planted_config(root, task):
    from dtrain.train.config import load_config

    recipe = root / "tokens.yaml" if task == "PaddedTokens" else CNN  # not an image task: a recipe of its own
    return load_config(
        str(recipe), [f"task=planted:{task}", "tracking.enabled=false", f"output_dir={root / task}", *PLANTED[task][0]]
    )


def _record_planted(rank, world, root):
    """What `--only invariance` records, for every planted task in this one process group: at
    world size 1 twice (the reference and its repeat), at world size 2 once per rank."""
    import torch

    from dtrain.studies.check.trace import for_tracing, record

    for task in PLANTED:
        cfg = _planted_config(root, task)
        records = [record(for_tracing(cfg), torch.device("cpu"), cfg.check.steps) for _ in range(3 - world)]
        torch.save(records, root / f"{task}-world{world}-rank{rank}.pt")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The records of the planted tasks, made in two process groups shared by all (the command's
    own launch is tested above and below): {task: (config, reference runs, rank runs)}."""
    import torch
    from helpers import spawn

    root = tmp_path_factory.mktemp("planted")
    # Written once, before the ranks start (each rank writing it raced another's read).
    (root / "tokens.yaml").write_text(
        "task: planted:PaddedTokens\ndata: {global_batch_size: 32}\noptim: {name: adamw, lr: 0.01}\n"
    )
    spawn(_record_planted, 1, root)
    spawn(_record_planted, 2, root)
    load = lambda name: torch.load(root / name, weights_only=True)  # noqa: E731
    return {
        task: (
            _planted_config(root, task),
            load(f"{task}-world1-rank0.pt"),
            [load(f"{task}-world2-rank{r}.pt")[0] for r in range(2)],
        )
        for task in PLANTED
    }


@pytest.mark.parametrize("task", PLANTED)
def test_a_planted_cause_is_named_at_its_step_and_module(planted, task):
    from dtrain.studies.check import exit_code
    from dtrain.studies.check import invariance as check_invariance

    overrides, part, where, cause, fix = PLANTED[task]
    cfg, ref, ranks = planted[task]
    found_results, details = check_invariance.compare(cfg, ref, ranks, 2, "")
    results = {r.name: r for r in found_results}
    head, found = results["invariance"], results[f"invariance/{part}"]
    assert cause in head.detail and fix in head.detail, head.detail
    assert where in found.detail, found.detail
    if part == "determinism":  # rounding-level differences between two identical runs: a warning
        assert exit_code(found_results) == 0 and head.verdict == found.verdict == "WARN", head.detail
        assert "agree within the tolerance" in head.detail and "at step 1" in found.detail
        return
    assert exit_code(found_results) == 1
    assert head.verdict == found.verdict == "FAIL" and "first difference at step 1" in head.detail, head.detail
    earlier = ("samples", "lr", "forward", "loss", "grads", "params", "buffers")
    for before in earlier[: earlier.index(part)] if part in earlier else ():
        assert results[f"invariance/{before}"].verdict == "PASS", (before, head.detail)
    assert details["first_step"] == 1


def test_the_module_table_starts_where_the_difference_starts(tmp_path):
    proc, results, report = invariance(tmp_path, CNN, "model.sync_bn=false")
    assert proc.returncode == 1
    modules = report["invariance"]["modules"]
    assert modules[0] == {"module": "model.stem.0", "rel": 0.0, "kind": "", "drew": False}  # the conv: identical
    assert modules[1]["module"] == "model.stem.1" and modules[1]["kind"] == "bn"
    assert "model.stem.1" in proc.stdout and "BatchNorm per rank <- first" in proc.stdout


# ------------------------------------------------------------------ refused in one line


@pytest.mark.parametrize(
    "args, words",
    [
        (["--only", "invariance"], "--nproc-per-node"),
        (["--only", "invariance,data", "--nproc-per-node", "2"], "ask for it alone"),
        (["--only", "invariance", "--nproc-per-node", "3"], "data.global_batch_size"),
    ],
)
def test_what_it_cannot_compare_is_one_line(tmp_path, args, words):
    proc = run_dtrain(["check", CNN, *args, "tracking.enabled=false", f"output_dir={tmp_path}/out"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert words in line


def test_under_a_launcher_it_says_how_to_start_it(tmp_path):
    proc = run_dtrain(
        ["check", CNN, "--only=invariance", "tracking.enabled=false", f"output_dir={tmp_path}/out"],
        cwd=tmp_path,
        nproc=2,
    )
    # torchrun's agent adds its own failure summary; the ranks' line is the one that says why.
    assert proc.returncode != 0 and "from a shell, not under a launcher" in proc.stderr
