"""`dtrain check`: every check PASSes (or SKIPs where it does not apply) on the shipped recipes,
and each one FAILs (or WARNs, where the finding is a hint) on a user task with the bug it
exists to catch planted (tests/planted.py)."""

import json

import mlflow
import pytest
import torch
import torch.distributed as dist
from helpers import ROOT, mlflow_store, run_dtrain, spawn

from dtrain.engines import build_engines
from dtrain.studies import check
from dtrain.studies.check import dist as dist_check
from dtrain.studies.check.context import Context
from dtrain.train.config import load_config

CNN = str(ROOT / "recipes" / "cnn_digits.yaml")
LM = str(ROOT / "recipes" / "transformer_charlm.yaml")
GAN = str(ROOT / "recipes" / "gan_digits.yaml")


def dtrain_check(tmp_path, recipe, *args, nproc=0, name="out"):
    proc = run_dtrain(
        ["check", recipe, f"output_dir={tmp_path / name}", "tracking.enabled=false", *args], cwd=tmp_path, nproc=nproc
    )
    path = tmp_path / name / "check.json"
    results = {c["name"]: c for c in json.loads(path.read_text())["checks"]} if path.exists() else {}
    return proc, results


def verdicts(results):
    return {name: c["verdict"] for name, c in results.items()}


# ------------------------------------------------------------------ the shipped recipes pass


@pytest.mark.slow
def test_the_cnn_recipe_passes_every_check_and_is_tracked(tmp_path):
    uri = mlflow_store(tmp_path)
    proc = run_dtrain(["check", CNN, f"output_dir={tmp_path / 'out'}", f"tracking.uri={uri}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {c["name"]: c for c in json.loads((tmp_path / "out" / "check.json").read_text())["checks"]}
    assert set(verdicts(results).values()) <= {"PASS", "SKIP"}, proc.stdout
    assert {n.split("/")[0] for n in results} == set(check.CHECKS)
    assert results["distributed"]["verdict"] == "SKIP"  # one process
    assert results["init_loss"]["value"] == pytest.approx(2.303, rel=0.1)  # ln 10
    assert (tmp_path / "out" / "check" / "lr_range.png").stat().st_size > 0
    assert (tmp_path / "out" / "check" / "data_batch.png").stat().st_size > 0
    assert "init_loss" in proc.stdout and "PASS" in proc.stdout
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment_by_name("cnn_digits") is None  # the training runs' experiment: none there
    (run,) = client.search_runs([client.get_experiment_by_name("cnn_digits-checks").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dtrain.kind"] == "check"
    assert run.info.run_name == "cnn_digits-check PASS"
    assert run.data.tags["check.overfit_batch"] == "PASS"
    assert run.data.metrics["check/init_loss"] == pytest.approx(results["init_loss"]["value"])
    assert "check.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_the_transformer_recipe_passes_every_check(tmp_path):
    # The recipe's task at half its depth and width: what the checks look at (init loss,
    # memorising, causality, LR range, data) is the task's, and it takes a third of the time.
    proc, results = dtrain_check(tmp_path, LM, "model.n_layer=2", "model.n_embd=64", "model.n_head=4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(verdicts(results).values()) <= {"PASS", "SKIP"}, proc.stdout
    assert results["causal"]["verdict"] == "PASS" and results["causal"]["value"] == 0
    assert "decoded" in results["data/inputs"]["detail"]


def test_the_gan_recipe_passes_what_applies(tmp_path):
    proc, results = dtrain_check(tmp_path, GAN)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    v = verdicts(results)
    assert v["batch_independence/d"] == v["batch_independence/g"] == "PASS"
    assert v["init_loss"] == v["overfit_batch"] == v["lr_range"] == "SKIP"
    assert all(v[n] == "PASS" for n in v if n.startswith("gradcheck/"))


@pytest.mark.slow
def test_distributed_passes_on_two_ranks_under_deepspeed_with_accumulation(tmp_path):
    """(DDP: `test_ranks_that_build_different_models` below.)"""
    proc, results = dtrain_check(
        tmp_path, CNN, "engine=deepspeed", "data.grad_accum_steps=2", "--only=distributed", nproc=2
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert verdicts(results) == {
        "distributed/samples": "PASS",
        "distributed/params": "PASS",
        "distributed/grads": "PASS",
    }, results
    assert results["distributed/grads"]["value"] < 1e-6


# ------------------------------------------------------------------ each check catches its bug


@pytest.mark.slow
def test_a_model_that_ignores_its_input(tmp_path):
    proc, results = dtrain_check(
        tmp_path, CNN, "task=planted:IgnoresInput", "--only=overfit_batch,input_independent,batch_independence"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    v = verdicts(results)
    assert v == {"overfit_batch": "FAIL", "input_independent": "WARN", "batch_independence": "WARN"}, proc.stdout
    assert "cannot memorise one batch" in results["overfit_batch"]["detail"]
    assert results["input_independent"]["value"] == pytest.approx(1.0)


@pytest.mark.slow
def test_a_view_that_mixes_the_batch(tmp_path):
    proc, results = dtrain_check(tmp_path, CNN, "task=planted:MixesBatch", "--only=batch_independence")
    assert proc.returncode == 1
    assert results["batch_independence"]["verdict"] == "FAIL" and results["batch_independence"]["value"] > 0
    # The same MLP without the bug passes: the check tells them apart.
    proc, results = dtrain_check(tmp_path, CNN, "task=helpers:MLPTask", "--only=batch_independence", name="ok")
    assert proc.returncode == 0 and results["batch_independence"]["verdict"] == "PASS"


def test_a_last_layer_with_a_large_bias(tmp_path):
    proc, results = dtrain_check(tmp_path, CNN, "task=planted:LargeBias", "--only=init_loss")
    assert proc.returncode == 1
    assert results["init_loss"]["verdict"] == "FAIL" and results["init_loss"]["value"] > 2 * 2.303
    assert "large bias" in results["init_loss"]["detail"]
    assert "dtrain: error" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_causal_mask_that_leaks_the_next_token(tmp_path):
    proc, results = dtrain_check(tmp_path, LM, "task=planted:LeakyCausal", "model.n_layer=1", "--only=causal")
    assert proc.returncode == 1
    assert results["causal"]["verdict"] == "FAIL"
    t = 64  # block_size 128 // 2
    assert f"position {t} sees position {t + 1}" in results["causal"]["detail"]
    assert "batch_independence" in results  # --only causal runs the check that reports it


def test_a_model_with_only_the_last_positions_output_skips_the_causal_check_saying_why(tmp_path):
    proc, results = dtrain_check(
        tmp_path, LM, "task=planted:LastPositionOnly", "model.n_layer=1", "--only=batch_independence"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr  # it used to FAIL with IndexError
    assert results["batch_independence"]["verdict"] == "PASS"
    assert results["causal"]["verdict"] == "SKIP"
    assert results["causal"]["detail"].startswith("the output has no position 64 of 128 (index 64 is out of bounds")


def test_a_split_with_duplicated_samples(tmp_path):
    uri = mlflow_store(tmp_path)
    proc, results = dtrain_check(
        tmp_path, CNN, "task=planted:DuplicatedSplit", "--only=data", "tracking.enabled=true", f"tracking.uri={uri}"
    )
    assert proc.returncode == 1
    assert results["data/duplicates"]["verdict"] == "FAIL"
    assert results["data/duplicates"]["detail"].startswith("40 of 360 test inputs")
    client = mlflow.MlflowClient(uri)  # a failing check shows in MLflow's run name and status column
    (run,) = client.search_runs([client.get_experiment_by_name("cnn_digits-checks").experiment_id])
    assert (run.info.run_name, run.info.status) == ("cnn_digits-check FAIL:data/duplicates", "FAILED")


def test_ranks_that_build_different_models(tmp_path):
    proc, results = dtrain_check(tmp_path, CNN, "task=planted:PerRankInit", "--only=distributed", nproc=2)
    assert proc.returncode == 0  # a WARN: DDP broadcasts rank 0's weights, training is consistent
    assert verdicts(results) == {
        "distributed/samples": "PASS",
        "distributed/params": "WARN",
        "distributed/grads": "PASS",
    }, results
    assert results["distributed/grads"]["value"] < 1e-6  # DDP's reduction, from rank 0's weights


def _broken_engine(rank, world, recipe, out):
    """An engine whose gradients are never all-reduced, and a loader that is not sharded: the
    distributed check FAILs both, on real gloo ranks."""
    cfg = load_config(recipe, [f"output_dir={out}", "tracking.enabled=false", "model.sync_bn=false"])
    ctx = Context.build(cfg, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    engine = build_engines(cfg, ctx.task.models(), ctx.device, ctx.plan, 1)["model"]
    engine.no_sync = lambda skip: engine.model.no_sync()  # the bug: skip the all-reduce on every micro-step
    grads = dist_check.mean_gradients(ctx, {"model": engine})
    assert grads.verdict == "FAIL" and grads.value > 1e-3, grads
    ctx.loader.sampler.rank = 0  # the bug: every rank reads rank 0's shard
    ctx._batches.clear()
    samples = dist_check.same_samples(ctx, world)
    assert samples.verdict == "FAIL" and "not sharded" in samples.detail, samples
    dist.barrier()


def test_distributed_fails_on_unreduced_gradients_and_unsharded_data(tmp_path):
    spawn(_broken_engine, 2, CNN, str(tmp_path / "out"))


def test_bad_check_names_are_one_line(tmp_path):
    proc, _ = dtrain_check(tmp_path, CNN, "--only=init_loss,overfit")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dtrain: error: --only='init_loss,overfit': names checks, comma-separated, of: " + ", ".join(check.NAMES)
    ]
