"""`profile.enabled`: torch.profiler on the chosen ranks only, a trace that loads, the top
operators, and the step-time breakdown in summary.json and MLflow."""

import json

import mlflow
import pytest
import torch
from helpers import ROOT, check, mlflow_store, run_dtrain

CNN = str(ROOT / "recipes" / "cnn_digits.yaml")


@pytest.mark.slow
def test_only_the_chosen_rank_profiles_and_the_trace_loads(tmp_path):
    uri = mlflow_store(tmp_path)
    out = tmp_path / "out"
    proc = check(
        run_dtrain(
            [
                "train",
                CNN,
                "train.max_steps=8",
                "train.eval_every_steps=0",
                "checkpoint.every_steps=0",
                "profile.enabled=true",
                "profile.ranks=[1]",
                "profile.wait=1",
                "profile.warmup=1",
                "profile.active=2",
                f"tracking.uri={uri}",
                "tracking.experiment=prof",
                f"output_dir={out}",
            ],
            cwd=tmp_path,
            nproc=2,
        )
    )
    files = sorted(p.name for p in (out / "profile").iterdir())
    assert files == ["breakdown_rank1.json", "ops_rank1.txt", "trace_rank1_step4.json"], files  # rank 1 only
    trace = json.loads((out / "profile" / "trace_rank1_step4.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"dtrain.data", "dtrain.forward", "dtrain.backward", "dtrain.optimizer"} <= names
    assert "Self CPU" in (out / "profile" / "ops_rank1.txt").read_text()
    profile = json.loads((out / "summary.json").read_text())["profile"]
    assert list(profile) == ["1"]
    parts = profile["1"]
    assert set(parts) == {"data_ms", "forward_ms", "backward_ms", "optimizer_ms", "collectives_ms", "sync_bn_ms"}
    assert parts["forward_ms"] > 0 and parts["backward_ms"] > 0 and parts["collectives_ms"] > 0  # DDP + SyncBN
    assert 0 < parts["sync_bn_ms"] < parts["forward_ms"] + parts["backward_ms"]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("profile, rank 1 ")]  # printed at the end
    assert "(mean ms of CPU time per recorded step; the parts overlap): data " in line, line
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("prof").experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "profile")} == {f"profile/{f}" for f in files}


def test_off_writes_nothing(tmp_path):
    out = tmp_path / "out"
    check(run_dtrain(["train", CNN, "train.max_steps=3", "tracking.enabled=false", f"output_dir={out}"], cwd=tmp_path))
    assert not (out / "profile").exists()
    assert "profile" not in json.loads((out / "summary.json").read_text())


def test_any_task_that_counts_tokens_gets_tokens_per_second_and_mfu(tmp_path):
    """`Task.tokens_per_sample` alone gives tokens/s in MLflow and summary.json, and MFU from the
    6 x parameters estimate when the peak is known (stated here: a CPU has no table entry).
    A task that counts no tokens gets neither."""
    uri = mlflow_store(tmp_path)
    common = [
        "train.max_steps=6",
        "train.eval_every_steps=0",
        "checkpoint.every_steps=0",
        "tracking.log_every=3",
        f"tracking.uri={uri}",
        "tracking.experiment=tokens",
    ]
    check(
        run_dtrain(
            [
                "train",
                CNN,
                *common,
                "task=planted:PixelTokens",
                "model.peak_tflops=1",
                f"output_dir={tmp_path / 'tokens'}",
            ],
            cwd=tmp_path,
        )
    )
    s = json.loads((tmp_path / "tokens" / "summary.json").read_text())
    params = sum(
        p.numel()
        for p in torch.load(tmp_path / "tokens" / "model.pt", weights_only=True).values()
        if p.is_floating_point()
    ) - _bn_buffers(tmp_path / "tokens" / "model.pt")
    assert s["tokens_per_s"] == pytest.approx(s["throughput"] * 64)
    assert s["mfu"] == pytest.approx(s["tokens_per_s"] * 6 * params / 1e12)
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(s["run_id"], "train/tokens_per_s")
    assert [m.step for m in history] == [3, 6] and all(m.value > 0 for m in history)

    check(run_dtrain(["train", CNN, *common, f"output_dir={tmp_path / 'plain'}"], cwd=tmp_path))
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert "tokens_per_s" not in plain and "mfu" not in plain


def _bn_buffers(path) -> int:
    """Elements of model.pt that are BatchNorm running statistics, not parameters."""
    state = torch.load(path, weights_only=True)
    return sum(v.numel() for k, v in state.items() if k.endswith(("running_mean", "running_var")))
