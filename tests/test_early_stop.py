"""Early stopping (`early_stop.*`): the best evaluation is checkpointed and kept, training ends
after `patience` evaluations without improvement, model.pt comes from the best."""

import json

import pytest
import torch

from dtrain.config import ConfigError, EarlyStopConfig
from dtrain.train.loop_parts import EarlyStopping
from dtrain.train.resume import TrainState
from helpers import CNN, check, load_params, max_param_diff, run_dtrain


def test_stops_after_patience_evaluations_without_an_improvement_beyond_min_delta():
    state = TrainState()
    stop = EarlyStopping(EarlyStopConfig(metric="loss", mode="min", patience=2, min_delta=0.01), state)
    seen = []
    for step, loss in [(2, 1.0), (4, 0.8), (6, 0.795), (8, 0.7), (10, 0.9), (12, 0.71)]:
        seen.append((stop.improved({"loss": loss}, step), stop.exhausted))
    # 0.795 is within min_delta of 0.8: not an improvement; 0.7 is; then two without.
    assert seen == [(True, False), (True, False), (False, False), (True, False), (False, False), (False, True)]
    assert (state.best_value, state.best_step) == (0.7, 8)
    up = EarlyStopping(EarlyStopConfig(metric="accuracy", mode="max", patience=1), TrainState())
    assert [up.improved({"accuracy": a}, i) for i, a in enumerate([0.5, 0.6, 0.6])] == [True, True, False]
    with pytest.raises(ConfigError, match=r"^early_stop.metric='acc': not an eval metric of this task; "
                                          r"it reports accuracy, loss"):
        EarlyStopping(EarlyStopConfig(metric="acc"), TrainState()).improved({"loss": 1.0, "accuracy": 0.5}, 1)


def test_a_planted_curve_stops_at_the_right_step_and_model_pt_is_the_best(tmp_path):
    """score per evaluation (every 2 steps): 0.1, 0.5, 0.45, 0.48 -> best at step 4, two
    evaluations without improvement, stop after step 8; checkpoint.keep=1 would have rotated
    step 4 away, but `best` keeps it, and model.pt holds its weights, not step 8's."""
    out = tmp_path / "out"
    proc = check(run_dtrain(["train", CNN, "task=planted:PlantedCurve", "tracking.enabled=false", "train.max_steps=40",
                             "train.eval_every_steps=2", "checkpoint.every_steps=2", "checkpoint.keep=1",
                             "early_stop.metric=score", "early_stop.mode=max", "early_stop.patience=2",
                             f"output_dir={out}"], cwd=tmp_path))
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 8
    assert s["early_stop"] == {"metric": "score", "best_value": 0.5, "best_step": 4, "stopped_early": True}
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "latest", "step_00000004", "step_00000008"]
    assert (ckpts / "best").read_text().strip() == "step_00000004"
    assert "early_stop: model.pt from step 4 (score 0.5)" in proc.stdout
    best = torch.load(ckpts / "step_00000004" / "model" / "state.pt", weights_only=True)["model"]
    last = torch.load(ckpts / "step_00000008" / "model" / "state.pt", weights_only=True)["model"]
    model = load_params(out / "model.pt")
    assert max_param_diff(best, model, buffers=True) == 0
    assert max_param_diff(last, model) > 1e-3  # the check sees the difference restoring makes


def test_a_nan_evaluation_is_never_the_best():
    """NaN compared false with everything and counted as an improvement (best_value NaN, never stops)."""
    state = TrainState()
    stop = EarlyStopping(EarlyStopConfig(metric="loss", mode="min", patience=2), state)
    assert [stop.improved({"loss": v}, i) for i, v in enumerate([float("nan"), 1.0, float("nan"), float("nan")])] \
        == [False, True, False, False]
    assert state.best_value == 1.0 and stop.exhausted


@pytest.mark.slow
def test_resumed_into_a_new_output_dir_model_pt_comes_from_the_best_in_the_old_one(tmp_path):
    """Stopped at step 6 (best at 4), resumed into another folder, stopped early after step 8:
    model.pt is step 4's, read from the first folder (it failed looking for it in the new one)."""
    common = ["task=planted:PlantedCurve", "tracking.enabled=false", "train.max_steps=40", "train.eval_every_steps=2",
              "checkpoint.every_steps=2", "checkpoint.keep=1", "early_stop.metric=score", "early_stop.mode=max",
              "early_stop.patience=2"]
    first, second = tmp_path / "first", tmp_path / "second"
    check(run_dtrain(["train", CNN, *common, "train.stop_at_step=6", f"output_dir={first}"], cwd=tmp_path))
    proc = check(run_dtrain(["train", CNN, *common, f"resume={first / 'checkpoints'}", f"output_dir={second}"],
                            cwd=tmp_path))
    assert f"early_stop: model.pt from step 4 (score 0.5) of {first / 'checkpoints'}" in proc.stdout
    best = torch.load(first / "checkpoints" / "step_00000004" / "model" / "state.pt", weights_only=True)["model"]
    assert max_param_diff(best, load_params(second / "model.pt"), buffers=True) == 0
    assert json.loads((second / "summary.json").read_text())["early_stop"]["best_step"] == 4


@pytest.mark.slow
def test_a_metric_the_task_does_not_report_is_refused_before_training(tmp_path):
    """It was found at the first evaluation, after training had started (or, for the plateau
    schedule and search trials, not listed). Now: one evaluation batch at start, one line."""
    for key in ("early_stop.metric=acc", "optim.plateau_metric=acc"):
        out = tmp_path / key.split(".")[0]
        proc = run_dtrain(["train", CNN, key, "optim.schedule=plateau", "tracking.enabled=false",
                           "train.max_steps=40", f"output_dir={out}"], cwd=tmp_path)
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and line == (f"dtrain: error: {key.split('=')[0]}='acc': not an eval metric of this "
                                                 "task; it reports accuracy, loss, samples"), proc.stderr[-2000:]
        assert "step 1/" not in proc.stdout and not (out / "checkpoints").exists()


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_keeps_the_best_evaluation_without_stopping(tmp_path, keep_best):
    """score per evaluation (every 2 steps): 0.1, 0.5, 0.45, 0.48 -> the best is step 4's.
    Training runs on to step 8 and model.pt is step 8's; checkpoint.keep=1 rotates step 4
    away unless keep_best marks it (the run without it shows the loss it prevents)."""
    out = tmp_path / "out"
    check(run_dtrain(["train", CNN, "task=planted:PlantedHeadline", "tracking.enabled=false", "train.max_steps=8",
                      "train.eval_every_steps=2", "checkpoint.every_steps=2", "checkpoint.keep=1",
                      f"checkpoint.keep_best={str(keep_best).lower()}", f"output_dir={out}"], cwd=tmp_path))
    s = json.loads((out / "summary.json").read_text())
    ckpts = out / "checkpoints"
    assert s["steps"] == 8 and "early_stop" not in s
    if not keep_best:
        assert "best" not in s and sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000008"]
        return
    assert s["best"] == {"metric": "score", "value": 0.5, "step": 4,
                         "checkpoint": str((ckpts / "step_00000004").resolve())}
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "latest", "step_00000004", "step_00000008"]
    last = torch.load(ckpts / "step_00000008" / "model" / "state.pt", weights_only=True)["model"]
    assert max_param_diff(last, load_params(out / "model.pt"), buffers=True) == 0
