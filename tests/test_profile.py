"""`profile.enabled`: torch.profiler on the chosen ranks only, a trace that loads, the top
operators, and the step-time breakdown in summary.json and MLflow."""

import json

import pytest
import mlflow

from helpers import ROOT, check, run_dtrain

CNN = str(ROOT / "recipes" / "cnn_digits.yaml")


@pytest.mark.slow
def test_only_the_chosen_rank_profiles_and_the_trace_loads(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"
    proc = check(run_dtrain(["train", CNN, "train.max_steps=8", "train.eval_every_steps=0", "checkpoint.every_steps=0",
                             "profile.enabled=true", "profile.ranks=[1]", "profile.wait=1", "profile.warmup=1",
                             "profile.active=2", f"tracking.uri={uri}", "tracking.experiment=prof",
                             f"output_dir={out}"], cwd=tmp_path, nproc=2))
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
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("profile, rank 1 ")]  # printed at the end
    assert "(mean ms of CPU time per recorded step; the parts overlap): data " in line, line
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("prof").experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "profile")} == {f"profile/{f}" for f in files}


def test_off_writes_nothing(tmp_path):
    out = tmp_path / "out"
    check(run_dtrain(["train", CNN, "train.max_steps=3", "tracking.enabled=false", f"output_dir={out}"], cwd=tmp_path))
    assert not (out / "profile").exists()
    assert "profile" not in json.loads((out / "summary.json").read_text())
