"""`monitor.every`: layer health logged to MLflow during training, warnings on vanishing or
exploding gradients; nothing logged (and nothing hooked) when off."""

import mlflow
import pytest
from helpers import ROOT, check, mlflow_store, run_dtrain

CNN = str(ROOT / "recipes" / "cnn_digits.yaml")
SHORT = [
    "train.max_steps=20",
    "train.eval_every_steps=0",
    "checkpoint.every_steps=0",
    "tracking.log_every=10",
    "model.widths=[16,32]",
    "model.blocks_per_stage=1",
]  # a small ResNet: what is measured is per layer


def monitored(tmp_path, *overrides, nproc=0, name="run"):
    uri = mlflow_store(tmp_path)
    proc = run_dtrain(
        [
            "train",
            CNN,
            *SHORT,
            f"tracking.uri={uri}",
            f"tracking.experiment={name}",
            f"output_dir={tmp_path / name}",
            *overrides,
        ],
        cwd=tmp_path,
        nproc=nproc,
    )
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    history = {
        k: [m.step for m in client.get_metric_history(run.info.run_id, k)]
        for k in run.data.metrics
        if k.startswith("monitor/")
    }
    return proc, run.data.metrics, history


@pytest.mark.slow
def test_layer_health_is_logged_every_n_steps(tmp_path):
    proc, metrics, history = monitored(tmp_path, "monitor.every=10")
    check(proc)
    assert history["monitor/update_ratio_median"] == [10, 20]
    weights = {k.split("/", 2)[2] for k in metrics if k.startswith("monitor/grad_norm/")}
    assert "stem.0.weight" in weights and "fc.weight" in weights and not any("bias" in w for w in weights)
    assert {k.split("/", 2)[2] for k in metrics if k.startswith("monitor/update_ratio/")} == weights
    assert 1e-6 < metrics["monitor/update_ratio_median"] < 1e-1
    assert 0 <= metrics["monitor/dead_frac/layers.0"] < 0.5  # a healthy ResNet block
    assert metrics["monitor/bn_collapsed_frac"] == 0
    assert "monitor:" not in proc.stderr  # no warning on a healthy run


def test_dead_relus_and_vanishing_gradients_are_reported(tmp_path):
    proc, metrics, _ = monitored(tmp_path, "task=planted:DeadReLU", "model.sync_bn=false", "monitor.every=10")
    check(proc)
    assert metrics["monitor/dead_frac/2"] == 1.0  # the ReLU after the -100 bias
    assert metrics["monitor/grad_norm/1.weight"] == 0.0
    # Both weights: the last layer's inputs are all zero, so its gradient is too.
    assert "step 10: vanishing gradients in 2 weight(s) (norm < 1e-07), first 1.weight" in proc.stderr


@pytest.mark.slow
def test_exploding_gradients_warn_at_the_documented_threshold(tmp_path):
    proc, metrics, _ = monitored(tmp_path, "monitor.every=10", "monitor.explode_above=1e-3")
    check(proc)
    assert "exploding gradients: global norm" in proc.stderr and "monitor.explode_above=0.001" in proc.stderr


@pytest.mark.slow
def test_off_logs_nothing(tmp_path):
    proc, metrics, _ = monitored(tmp_path)
    check(proc)
    assert not [k for k in metrics if k.startswith("monitor/")]


@pytest.mark.slow
def test_sharded_engines_report_whole_weights(tmp_path):
    """Under ZeRO-3 every rank holds a shard: the monitor gathers whole gradients and weights."""
    proc, metrics, _ = monitored(
        tmp_path,
        "monitor.every=10",
        "engine=deepspeed",
        "deepspeed.zero_stage=3",
        "train.max_steps=10",
        "model.sync_bn=false",
        nproc=2,
    )
    check(proc)
    assert metrics["monitor/grad_norm/fc.weight"] > 0
    assert 1e-6 < metrics["monitor/update_ratio/fc.weight"] < 1e-1
