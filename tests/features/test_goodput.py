"""Goodput: the run's wall time split into parts that add up, over attempts that a real SIGKILL
separates; `checkpoint.every_steps: auto` at Young/Daly's interval from a planted checkpoint time."""

import json
import math
import re
import subprocess

import mlflow
import pytest
from helpers import ROOT, check, env_for_cli, mlflow_store, run_dtrain, torchrun_cmd, torchrun_env

from dtrain.config import ConfigError
from dtrain.features import goodput
from dtrain.train.config import load_config

RECIPE = str(ROOT / "recipes" / "cnn_digits.yaml")
FAULTY = ["task=faulty:FaultyTask", "model.hidden=32", "data.augment=false"]
PARTS = ("productive_s", "startup_s", "restart_s", "lost_s", "downtime_s", "checkpoint_s", "eval_s", "other_s")


def test_young_daly_interval_follows_the_checkpoint_time():
    interval = goodput.Interval(mtbf_s=3600.0)
    assert interval.update(0.5, step_time_s=0.1, max_steps=10_000)  # first estimate: said
    assert interval.tau() == pytest.approx(60.0) and interval.steps == 600
    assert not interval.update(0.5, 0.1, 10_000)  # nothing changed: nothing to say
    assert interval.update(4.5, 0.1, 10_000)  # slower checkpoints: δ smoothed to 2.5 s, τ sqrt(5) x longer
    assert interval.delta_s == pytest.approx(2.5) and interval.steps == round(math.sqrt(2 * 2.5 * 3600) / 0.1)
    assert interval.update(4.5, 0.1, max_steps=100) and interval.steps == 100  # never past the run's end
    assert goodput.Interval(3600.0, delta_s=0.5).expected_loss(restart_s=30.0) == pytest.approx(
        0.5 / 60 + (30 + 30) / 3600
    )
    # The property the interval exists for: τ minimises the expected loss (the failure it guards
    # against: a fixed interval a user guessed, 10 x shorter or longer, loses more).
    best = goodput.Interval(3600.0, delta_s=0.5)
    loss = lambda tau: 0.5 / tau + (tau / 2 + 30) / 3600  # noqa: E731
    assert loss(best.tau()) < min(loss(best.tau() / 10), loss(best.tau() * 10))


def test_every_steps_takes_an_integer_or_auto():
    assert load_config(RECIPE, ["checkpoint.every_steps=auto"]).checkpoint.every_steps == "auto"
    assert load_config(RECIPE, ["checkpoint.every_steps=25"]).checkpoint.every_steps == 25
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, ["checkpoint.every_steps=often"])
    assert str(e.value) == "checkpoint.every_steps='often': must be an integer or auto"
    with pytest.raises(ConfigError, match="checkpoint.mtbf_hours"):
        load_config(RECIPE, ["checkpoint.every_steps=auto", "checkpoint.mtbf_hours=-1"])


def _auto_lines(stdout: str) -> list[tuple[int, float, float]]:
    """(steps, δ, τ) of each `checkpoint.every_steps=auto:` line."""
    pattern = r"auto: every (\d+) steps .* sqrt\(2 x ([\d.]+)s checkpoint x ([\d.e-]+) h MTBF\) = ([\d.]+)s"
    found = [re.search(pattern, line) for line in stdout.splitlines() if "every_steps=auto" in line]
    return [(int(m[1]), float(m[2]), float(m[4])) for m in found if m and m[3] == "0.0002"]


@pytest.mark.slow
def test_auto_sets_the_interval_from_the_measured_checkpoint_time_and_follows_it(tmp_path):
    # Rank 0's checkpoints take 0.1 s more until step 60, 0.8 s more after: the interval must
    # grow. Written in the background, rank 1's checkpoints block it for none of that: were the
    # interval its own, the ranks would checkpoint at different steps and hang (the timeout
    # turns that into a failure here).
    proc = check(
        run_dtrain(
            [
                "train",
                RECIPE,
                *FAULTY,
                "model.fault=slow_checkpoint:0:60",
                "checkpoint.async=true",
                "tracking.enabled=false",
                "train.max_steps=400",
                "train.eval_every_steps=0",
                "checkpoint.every_steps=auto",
                "checkpoint.mtbf_hours=0.0002",
                "train.collective_timeout_s=20",
                f"output_dir={tmp_path / 'out'}",
            ],
            cwd=tmp_path,
            nproc=2,
            timeout=180,
        )
    )
    lines = _auto_lines(proc.stdout)
    assert len(lines) >= 2, proc.stdout
    (first, delta1, tau1), (later, delta2, tau2) = lines[0], lines[-1]
    assert 0.1 <= delta1 < 0.3 and delta2 > 0.4, proc.stdout
    for delta, tau in ((delta1, tau1), (delta2, tau2)):
        assert tau == pytest.approx(math.sqrt(2 * delta * 0.72), abs=0.06)  # MTBF 0.0002 h = 0.72 s
    assert later > 1.4 * first, proc.stdout
    g = json.loads((tmp_path / "out" / "summary.json").read_text())["goodput"]
    assert g["checkpoint_s"] >= 0.1 * g["by_attempt"][0]["checkpoints"]  # every one waited for the planted time


@pytest.mark.slow
def test_the_parts_add_up_over_a_sigkill_restart_and_count_the_redone_steps(tmp_path):
    uri, out = mlflow_store(tmp_path), tmp_path / "out"
    # Under FSDP2 with checkpoints written in the background: δ is the copy, the account the same.
    overrides = [
        *FAULTY,
        "engine=fsdp",
        "checkpoint.async=true",
        "model.fault=kill:1:29",
        "train.max_steps=40",
        "checkpoint.every_steps=20",
        "train.eval_every_steps=15",
        "tracking.log_every=1",
        "resume=auto",
        f"tracking.uri={uri}",
        "tracking.experiment=goodput",
        f"output_dir={out}",
    ]
    proc = subprocess.run(
        torchrun_cmd(2, RECIPE, overrides, max_restarts=1),
        cwd=tmp_path,
        env=torchrun_env(env_for_cli()),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "resumed at step 20" in proc.stdout, proc.stderr[-3000:]
    g = json.loads((out / "summary.json").read_text())["goodput"]
    first, second = g["by_attempt"]
    assert g["attempts"] == 2 and first["ended"] == "" and second["ended"] == "finished"
    # Rank 1 died before its 29th step: rank 0 had recorded up to 8 steps past the checkpoint.
    assert 20 < first["reached"] <= 28 and g["lost_steps"] == first["reached"] - 20 > 0
    assert g["lost_s"] == pytest.approx(g["lost_steps"] * first["step_s"] / first["steps"])
    assert second["first_step"] == 20 and second["to_group_s"] < second["to_loaded_s"] < second["to_first_step_s"]
    assert g["restart_s"] == second["to_first_step_s"] > 0 and g["downtime_s"] > 0 and g["eval_s"] > 0
    assert g["checkpoint_write_s"] > 0 and second["checkpoints"] >= 1
    assert all(g[p] >= 0 for p in PARTS), g
    assert sum(g[p] for p in PARTS) == pytest.approx(g["wall_s"], rel=1e-6)
    assert g["other_s"] < 0.05 * g["wall_s"], g  # the named parts account for the time
    assert g["goodput"] == pytest.approx(g["productive_s"] / g["wall_s"])
    assert f"goodput {g['goodput']:.1%} over 2 attempts" in proc.stdout
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("goodput").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["goodput/attempts"] == 2
    assert run.data.metrics["goodput/lost_steps"] == g["lost_steps"]
