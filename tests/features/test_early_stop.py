"""Early stopping (`early_stop.*`): the best evaluation is checkpointed and kept, training ends
after `patience` evaluations without improvement, model.pt comes from the best."""

import json

import pytest
import torch
from helpers import CNN, FakeRun, check, load_params, max_param_diff, run_dtrain

from dtrain.errors import ConfigError
from dtrain.features.early_stop import EarlyStop
from dtrain.train.config import load_config


def watching(*overrides: str, metrics=("accuracy", "loss")) -> tuple[EarlyStop, FakeRun]:
    run = FakeRun(load_config(CNN, ["tracking.enabled=false", *overrides]), metrics=list(metrics))
    feature = EarlyStop(run)
    feature.setup(run)
    return feature, run


def evaluations(
    feature: EarlyStop, run: FakeRun, values: list[tuple[int, dict[str, float]]]
) -> list[tuple[bool, bool]]:
    """(improved: a best checkpoint asked for, stopped) after each evaluation."""
    seen = []
    for step, metrics in values:
        run.step, asked = step, len(run.asked)
        feature.after_eval(run, metrics)
        seen.append((len(run.asked) > asked, run.stopped is not None))
    return seen


def test_stops_after_patience_evaluations_without_an_improvement_beyond_min_delta():
    stop, run = watching("early_stop.metric=loss", "early_stop.patience=2", "early_stop.min_delta=0.01")
    seen = evaluations(
        stop,
        run,
        [
            (2, {"loss": 1.0}),
            (4, {"loss": 0.8}),
            (6, {"loss": 0.795}),
            (8, {"loss": 0.7}),
            (10, {"loss": 0.9}),
            (12, {"loss": 0.71}),
        ],
    )
    # 0.795 is within min_delta of 0.8: not an improvement; 0.7 is; then two without.
    assert seen == [(True, False), (True, False), (False, False), (True, False), (False, False), (False, True)]
    assert (stop.best_value, stop.best_step) == (0.7, 8) and run.asked[-1] == (8, True)
    up, run = watching("early_stop.metric=accuracy", "early_stop.mode=max", "early_stop.patience=1")
    assert [i for i, _ in evaluations(up, run, [(i, {"accuracy": a}) for i, a in enumerate([0.5, 0.6, 0.6])])] == [
        True,
        True,
        False,
    ]
    with pytest.raises(
        ConfigError,
        match=r"^early_stop.metric='acc': not an eval metric of this task; "
        r"it reports accuracy, loss",
    ):
        watching("early_stop.metric=acc")


def test_before_the_model_is_settled_no_evaluation_is_the_best():
    """Pruning raises `run.settled_from` to its last round: a dense model's evaluation before it
    is another kind of model than the run makes, and model.pt came from it (sparsity 0)."""
    stop, run = watching("early_stop.metric=loss", "early_stop.patience=2")
    run.settled_from = 6
    seen = evaluations(stop, run, [(2, {"loss": 0.1}), (4, {"loss": 0.2}), (6, {"loss": 0.9}), (8, {"loss": 0.8})])
    assert [i for i, _ in seen] == [False, False, True, True] and stop.best_step == 8
    # The check can fail: unsettled, step 2's is the best the run restores.
    stop, run = watching("early_stop.metric=loss", "early_stop.patience=2")
    evaluations(stop, run, [(2, {"loss": 0.1}), (4, {"loss": 0.2}), (6, {"loss": 0.9})])
    assert stop.best_step == 2


def test_with_no_finite_evaluation_there_is_no_best_to_restore_and_it_says_so():
    stop, run = watching("early_stop.metric=loss", "early_stop.patience=2")
    evaluations(stop, run, [(2, {"loss": float("nan")}), (4, {"loss": float("nan")})])
    stop.end(run, "finished")
    assert run.lines == ["early_stop: no evaluation gave a finite loss; model.pt holds the weights of step 4"]
    assert "best checkpoint (step 0)" not in " ".join(run.lines)


def test_a_planted_curve_stops_at_the_right_step_and_model_pt_is_the_best(tmp_path):
    """score per evaluation (every 2 steps): 0.1, 0.5, 0.45, 0.48 -> best at step 4, two
    evaluations without improvement, stop after step 8; checkpoint.keep=1 would have rotated
    step 4 away, but `best` keeps it, and model.pt holds its weights, not step 8's."""
    out = tmp_path / "out"
    proc = check(
        run_dtrain(
            [
                "train",
                CNN,
                "task=planted:PlantedCurve",
                "tracking.enabled=false",
                "train.max_steps=40",
                "train.eval_every_steps=2",
                "checkpoint.every_steps=2",
                "checkpoint.keep=1",
                "early_stop.metric=score",
                "early_stop.mode=max",
                "early_stop.patience=2",
                f"output_dir={out}",
            ],
            cwd=tmp_path,
        )
    )
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
    stop, run = watching("early_stop.metric=loss", "early_stop.patience=2")
    seen = evaluations(
        stop, run, [(i, {"loss": v}) for i, v in enumerate([float("nan"), 1.0, float("nan"), float("nan")])]
    )
    assert [i for i, _ in seen] == [False, True, False, False]
    assert stop.best_value == 1.0 and seen[-1][1]


@pytest.mark.slow
def test_resumed_into_a_new_output_dir_model_pt_comes_from_the_best_in_the_old_one(tmp_path):
    """Stopped at step 6 (best at 4), resumed into another folder, stopped early after step 8:
    model.pt is step 4's, read from the first folder (it failed looking for it in the new one)."""
    common = [
        "task=planted:PlantedCurve",
        "tracking.enabled=false",
        "train.max_steps=40",
        "train.eval_every_steps=2",
        "checkpoint.every_steps=2",
        "checkpoint.keep=1",
        "early_stop.metric=score",
        "early_stop.mode=max",
        "early_stop.patience=2",
    ]
    first, second = tmp_path / "first", tmp_path / "second"
    check(run_dtrain(["train", CNN, *common, "train.stop_at_step=6", f"output_dir={first}"], cwd=tmp_path))
    proc = check(
        run_dtrain(["train", CNN, *common, f"resume={first / 'checkpoints'}", f"output_dir={second}"], cwd=tmp_path)
    )
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
        proc = run_dtrain(
            [
                "train",
                CNN,
                key,
                "optim.schedule=plateau",
                "tracking.enabled=false",
                "train.max_steps=40",
                f"output_dir={out}",
            ],
            cwd=tmp_path,
        )
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and line == (
            f"dtrain: error: {key.split('=')[0]}='acc': not an eval metric of this "
            "task; it reports accuracy, loss, samples"
        ), proc.stderr[-2000:]
        assert "step 1/" not in proc.stdout and not (out / "checkpoints").exists()


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_keeps_the_best_evaluation_without_stopping(tmp_path, keep_best):
    """score per evaluation (every 2 steps): 0.1, 0.5, 0.45, 0.48 -> the best is step 4's.
    Training runs on to step 8 and model.pt is step 8's; checkpoint.keep=1 rotates step 4
    away unless keep_best marks it (the run without it shows the loss it prevents)."""
    out = tmp_path / "out"
    check(
        run_dtrain(
            [
                "train",
                CNN,
                "task=planted:PlantedHeadline",
                "tracking.enabled=false",
                "train.max_steps=8",
                "train.eval_every_steps=2",
                "checkpoint.every_steps=2",
                "checkpoint.keep=1",
                f"checkpoint.keep_best={str(keep_best).lower()}",
                f"output_dir={out}",
            ],
            cwd=tmp_path,
        )
    )
    s = json.loads((out / "summary.json").read_text())
    ckpts = out / "checkpoints"
    assert s["steps"] == 8 and "early_stop" not in s
    if not keep_best:
        assert "best" not in s and sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000008"]
        return
    assert s["best"] == {
        "metric": "score",
        "value": 0.5,
        "step": 4,
        "checkpoint": str((ckpts / "step_00000004").resolve()),
    }
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", "latest", "step_00000004", "step_00000008"]
    last = torch.load(ckpts / "step_00000008" / "model" / "state.pt", weights_only=True)["model"]
    assert max_param_diff(last, load_params(out / "model.pt"), buffers=True) == 0
