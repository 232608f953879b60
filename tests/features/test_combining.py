"""Combining models on 2 CPU ranks: distillation, EWC, pruning, soups and interpolation.

One small digits CNN throughout (16 channels, one block), trained briefly; the runs are made
once per module and shared. Every claim is measured against the run that lacks the feature:
the student alone, the plain fine-tune, the unpruned model, the ingredients of a soup.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import CNN, LM, TINY_LM, check, max_param_diff, mlflow_store, run_dtrain, spawn, trained_once

from dtrain.checkpoint import safeload
from dtrain.features import distill, ewc, prune
from dtrain.postrun import soup

SMALL = [
    "model.widths=[16]",
    "model.blocks_per_stage=1",
    "optim.lr=0.8",
    "optim.warmup_steps=10",
    "tracking.enabled=false",
    "checkpoint.every_steps=0",
    "data.augment=false",
    "train.eval_every_steps=0",
]
FIRST, SECOND = "data.classes=[0,1,2,3,4]", "data.classes=[5,6,7,8,9]"


TEACHER = (
    "model.widths=[32,64]",
    "model.blocks_per_stage=2",
    "optim.lr=0.2",
    "train.epochs=10",
    "optim.warmup_steps=50",
)
PRUNE = (
    "engine=fsdp",
    "prune.amount=0.6",
    "prune.schedule=gradual",
    "prune.every_steps=3",
    "prune.end_step=9",
    "train.max_steps=14",
    "model.init_from={first}",
)
ONE_RANK: list[tuple[str, tuple[str, ...]]] = [  # what the tests only use: on 1 rank, first
    ("teacher", TEACHER),
    ("first", (FIRST, "train.epochs=15")),
    *[
        (f"ft-{lr}", (SECOND, "train.max_steps=30", "model.init_from={first}", f"optim.lr={lr}", f"seed={i}"))
        for i, lr in enumerate((0.4, 0.8, 1.6))
    ],
]
TWO_RANKS: list[tuple[str, tuple[str, ...]]] = [  # in order; {name} is that run's folder
    ("alone", ("train.epochs=4",)),
    (
        "taught",
        (
            "train.epochs=4",
            "distill.teacher={teacher}",
            "tracking.enabled=true",
            "tracking.uri=sqlite:///{root}/mlflow.db",
            "tracking.log_every=20",
        ),
    ),
    ("alone-12", ("train.max_steps=12",)),
    ("taught-ddp", ("train.max_steps=12", "distill.teacher={teacher}")),
    ("taught-fsdp", ("train.max_steps=12", "distill.teacher={teacher}", "engine=fsdp")),
    ("taught-zero3", ("train.max_steps=12", "distill.teacher={teacher}", "engine=deepspeed", "deepspeed.zero_stage=3")),
    (
        "features",
        (
            "train.max_steps=6",
            "distill.teacher={teacher}",
            "distill.kind=features",
            "distill.layers=[stem=stem]",
            "model.widths=[32]",
            "engine=fsdp",
            "precision=bf16",
        ),
    ),
    ("plain", (SECOND, "train.epochs=8", "model.init_from={first}")),
    ("ewc", (SECOND, "train.epochs=8", "ewc.from={first}")),
    ("plain-6", (SECOND, "train.max_steps=6", "model.init_from={first}")),
    ("ewc-ddp-6", (SECOND, "train.max_steps=6", "ewc.from={first}", "ewc.lambda=100")),
    # Stopped after step 3 and resumed: the Fisher is estimated again, alike.
    (
        "ewc-fsdp-6",
        (SECOND, "train.max_steps=6", "ewc.from={first}", "ewc.lambda=100", "engine=fsdp", "train.stop_at_step=3"),
    ),
    ("ewc-fsdp-6", (SECOND, "train.max_steps=6", "ewc.from={first}", "ewc.lambda=100", "engine=fsdp", "resume=auto")),
    ("pruned", PRUNE),
    ("pruned-resumed", (*PRUNE, "train.stop_at_step=5")),
    ("pruned-resumed", (*PRUNE, "resume=auto")),
    ("lm-teacher", ()),
    ("lm-student", ("model.n_embd=32", "distill.teacher={lm-teacher}", "distill.alpha=0.5")),
]
LM_RUNS = {"lm-teacher", "lm-student"}
"""The Transformer's runs: the tiny LM of helpers.TINY_LM, not SMALL's CNN."""


def _train(rank: int, world: int, root: str, runs: list[tuple[str, tuple[str, ...]]]) -> None:
    """Every run in order, in this one process group (no process start-up per run)."""
    from dtrain.runtime.distributed import DistEnv
    from dtrain.train.config import load_config
    from dtrain.train.fit import fit

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # what a launcher sets (DeepSpeed reads it)
    for name, overrides in runs:
        given = list(overrides)
        for placeholder in ("teacher", "first", "lm-teacher"):
            given = [o.replace("{" + placeholder + "}", f"{root}/{placeholder}") for o in given]
        given = [o.replace("{root}", root) for o in given]
        recipe, base = (LM, TINY_LM) if name in LM_RUNS else (CNN, SMALL)
        cfg = load_config(recipe, [*base, f"output_dir={root}/{name}", *given])
        outcome = fit(cfg, DistEnv(rank=rank, world_size=world, local_world_size=world), torch.device("cpu"))
        assert outcome.status in ("finished", "stopped"), (name, outcome)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(name)`: the folder of a run above, all trained once per session: the first xdist
    worker to need them trains them (a file lock), the other waits and reads them."""

    def train(root: Path) -> None:
        spawn(_train, 1, str(root), ONE_RANK)
        spawn(_train, 2, str(root), TWO_RANKS)

    root = trained_once(tmp_path_factory, "combining", train)

    def run(name: str) -> Path:
        return root / name

    run.root = root  # type: ignore[attr-defined]
    return run


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def weights(run: Path) -> dict[str, torch.Tensor]:
    return safeload.load_weights(run / "model.safetensors")


def evaluate(run: Path, *overrides: str) -> float:
    """Held-out accuracy of a run's model (`dtrain evaluate`, in this process)."""
    return soup.evaluate(str(run), overrides)["accuracy"]


# ----------------------------------------------------------------------------- the formulas


def test_distillation_loss_equals_the_hand_computed_value():
    """Two classes, T=2: the softened distributions differ by a logit gap of 0.5, so
    KL = (p1 - p0) * 0.5 = tanh(0.25) * 0.5, times T^2 = 4."""
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert distill.kd_loss(student, teacher, 2.0).item() == pytest.approx(4 * 0.5 * math.tanh(0.25), rel=1e-6)
    # The direction matters (KL(teacher || student), not the reverse) once the two are not mirror images.
    s, t = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    assert distill.kd_loss(s, t, 1.0).item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)
    assert distill.kd_loss(s, t, 1.0).item() != pytest.approx((q * (q / p).log()).sum().item(), rel=1e-3)


def test_the_ewc_penalty_equals_the_formula():
    theta, anchor, fisher = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 2.0, 1.0]), torch.tensor([2.0, 9.0, 0.25])
    # lambda / 2 * (2 * 0.25 + 9 * 0 + 0.25 * 4) = 3 / 2 * 1.5
    assert ewc.penalty([(theta, fisher, anchor)], 3.0).item() == pytest.approx(2.25)


def test_distillation_on_padded_rows_counts_only_the_text():
    """A causal LM's padded positions (targets -100) are not the text: the soft term is the mean
    over the positions that are, whatever the two models say at the padding."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    targets = torch.tensor([[1, 2, 3, -100, -100], [4, 5, -100, -100, -100]])
    from dtrain.tasks.hf import CausalLMTask

    mask = CausalLMTask.output_mask(CausalLMTask.__new__(CausalLMTask), (None, targets))
    masked = distill.kd_loss(student, teacher, 2.0, mask)
    keep = mask.reshape(-1)
    alone = distill.kd_loss(student.reshape(-1, 7)[keep], teacher.reshape(-1, 7)[keep], 2.0)
    assert masked == pytest.approx(alone.item()) and int(keep.sum()) == 5
    scrambled = teacher.clone()
    scrambled[~mask] = 100.0  # the padding's logits, anything at all
    assert distill.kd_loss(student, scrambled, 2.0, mask) == pytest.approx(masked.item())
    assert abs(distill.kd_loss(student, scrambled, 2.0).item() - masked.item()) > 1e-2  # what the mask prevents


def test_magnitude_pruning_reaches_exactly_the_amount_and_structured_prunes_whole_channels():
    torch.manual_seed(0)
    ws = [torch.randn(8, 4, 3, 3), torch.randn(10, 8)]
    masks = prune.masks_for(ws, 0.3, "magnitude", [0, 0])
    total = sum(w.numel() for w in ws)
    assert sum(int((m == 0).sum()) for m in masks) == round(0.3 * total)
    kept = torch.cat([w[m.bool()].abs() for w, m in zip(ws, masks)])
    gone = torch.cat([w[~m.bool()].abs() for w, m in zip(ws, masks)])
    assert gone.max() <= kept.min()  # one global threshold
    channels = prune.masks_for(ws, 0.5, "structured", [0, 0])
    for m in channels:
        rows = m.flatten(1).sum(1)
        assert set(rows.tolist()) <= {0.0, float(m[0].numel())} and int((rows == 0).sum()) == round(0.5 * len(m))


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["distill.teacher={run}", "distill.alpha=0"], "distill.alpha=0.0: must be in (0, 1]"),
        (
            ["distill.teacher={run}", "distill.kind=features"],
            "distill.layers=[]: needs `student.module=teacher.module` pairs",
        ),
        (["prune.amount=1"], "prune.amount=1.0: must be in [0, 1) (0: off)"),
        (["prune.amount=0.5", "ema.decay=0.9", "ema.save=true"], "ema.save=True: not with prune.amount"),
        (["ewc.from={run}", "engine=deepspeed"], "ewc.from='{run}': not with engine=deepspeed"),
        (["prune.amount=0.5", "engine=deepspeed"], "prune.amount=0.5: not with engine=deepspeed"),
        (["ewc.from=nowhere"], "ewc.from='nowhere': no such run folder or weights file"),
    ],
)
def test_bad_combining_keys_are_refused_before_any_rank_starts(tmp_path, overrides, line):
    from dtrain.config import ConfigError
    from dtrain.train.config import load_config, validate

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ConfigError) as e:
        validate(load_config(CNN, [o.format(run=run) for o in overrides]))
    assert str(e.value).startswith(line.format(run=run))


@pytest.mark.slow
def test_a_gan_refuses_distillation_in_one_line(tmp_path):
    proc = run_dtrain(
        ["train", str(Path(CNN).with_name("gan_digits.yaml")), f"distill.teacher={tmp_path}", "--nproc-per-node", "2"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"distill.teacher='{tmp_path}': not with the task gan: distillation needs a task with one model and a loss "
            "(dtrain.Task); a GAN has two models and its own step"
        )
    )


# ----------------------------------------------------------------------------- distillation


@pytest.mark.slow
def test_a_distilled_student_beats_the_same_student_trained_alone(runs):
    teacher, alone, taught, root = runs("teacher"), runs("alone"), runs("taught"), runs.root
    t, a, d = (summary(r)["eval"]["accuracy"] for r in (teacher, alone, taught))
    print(f"teacher {t:.3f} | student alone {a:.3f} | distilled {d:.3f}")
    assert d > a + 0.05 and summary(taught)["teacher_eval"]["accuracy"] == pytest.approx(t)
    # MLflow holds the teacher's metric beside the student's, and the two terms of the loss.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store(root))
    run_id = summary(taught)["run_id"]
    logged = client.get_run(run_id).data.metrics
    assert logged["teacher/accuracy"] == pytest.approx(t) and "eval/accuracy" in logged
    assert {"train/task_loss", "train/distill_loss"} <= set(logged)


@pytest.mark.slow
def test_distillation_under_fsdp2_with_a_sharded_teacher_and_under_zero_3_matches_ddp(runs):
    ddp, alone = runs("taught-ddp"), runs("alone-12")
    for engine in ("taught-fsdp", "taught-zero3"):
        diff = max_param_diff(weights(ddp), weights(runs(engine)))
        assert diff <= 1e-5, (engine, diff)
    assert max_param_diff(weights(ddp), weights(alone)) > 1e-2  # the teacher moved the student


@pytest.mark.slow
def test_features_distillation_matches_named_modules_and_refuses_other_shapes(runs):
    """Under FSDP2 in bf16: the hooks see the sharded models' outputs, in bf16."""
    teacher = runs("teacher")
    out = runs("features")
    s = summary(out)
    assert s["steps"] == 6 and s["final_loss"] < s["initial_loss"]
    proc = run_dtrain(
        [
            "train",
            CNN,
            *SMALL,
            "train.max_steps=2",
            f"distill.teacher={teacher}",
            "distill.kind=features",
            "distill.layers=[stem=stem]",
            f"output_dir={runs.root / 'bad'}",
        ],
        cwd=runs.root,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "distill.layers='stem=stem': outputs differ in shape: student [" in proc.stderr


@pytest.mark.slow
def test_a_teacher_of_another_task_shape_is_refused_before_training(runs, tmp_path):
    teacher = runs("teacher")
    proc = run_dtrain(
        [
            "train",
            CNN,
            *SMALL,
            FIRST,
            "train.max_steps=2",
            f"distill.teacher={teacher}",
            f"output_dir={tmp_path / 'x'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "do not match the student's [" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.slow
def test_a_transformer_distils_per_token_from_a_wider_teacher(runs):
    """The LM teacher (64 wide) teaches a 32-wide student; the KL is taken at every position."""
    teacher, student = runs("lm-teacher"), runs("lm-student")
    s = summary(student)
    assert s["teacher_eval"]["loss"] == pytest.approx(summary(teacher)["eval"]["loss"], rel=1e-6)
    assert s["final_loss"] < s["initial_loss"] and s["parameters"] < summary(teacher)["parameters"]


# ----------------------------------------------------------------------------- EWC


@pytest.mark.slow
def test_ewc_keeps_the_first_task_where_plain_fine_tuning_forgets_it(runs):
    first, plain, kept = runs("first"), runs("plain"), runs("ewc")
    scores = {
        name: (evaluate(r, FIRST), evaluate(r, SECOND))
        for name, r in (("first", first), ("plain", plain), ("ewc", kept))
    }
    print("accuracy on (0-4, 5-9):", scores)
    assert scores["first"][0] > 0.95
    assert scores["plain"][0] < 0.85 and scores["plain"][1] > 0.9  # learnt the second, forgot the first
    assert scores["ewc"][0] > 0.9 and scores["ewc"][1] > 0.9  # learnt the second, kept the first


@pytest.mark.slow
def test_ewc_under_fsdp2_penalises_the_shards_as_ddp_penalises_the_whole_and_resumes_exactly(runs):
    """The FSDP2 run stopped after step 3 and resumed (the Fisher is estimated again, alike)."""
    ddp, plain = runs("ewc-ddp-6"), runs("plain-6")
    fsdp = runs("ewc-fsdp-6")
    assert max_param_diff(weights(ddp), weights(fsdp)) <= 1e-5
    assert max_param_diff(weights(ddp), weights(plain)) > 1e-3  # the penalty changed the steps


# ----------------------------------------------------------------------------- pruning


@pytest.mark.slow
def test_a_pruned_run_resumes_exactly_and_leaves_a_plain_sparse_model(runs):
    straight, resumed = runs("pruned"), runs("pruned-resumed")  # the second stopped after step 5, then resumed
    w, r = weights(straight), weights(resumed)
    assert max_param_diff(w, r) <= 1e-6
    prunable = [k for k, v in w.items() if k.endswith("weight") and v.dim() >= 2]
    zeros, total = sum(int((w[k] == 0).sum()) for k in prunable), sum(w[k].numel() for k in prunable)
    assert zeros == round(0.6 * total) and summary(straight)["sparsity"] == zeros / total
    # The pruned weights stayed zero through 5 steps of fine-tuning after the last round, and
    # model.safetensors is a plain state_dict (no weight_orig / weight_mask): `dtrain.load` takes it.
    import dtrain

    model = dtrain.load(straight).model
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    # The last FSDP2 checkpoint (DCP shards) is read whole by the soup tools: the same model.
    last = resumed / "checkpoints" / "step_00000014"
    assert max_param_diff(soup.read(last).weights, w) <= 1e-6


# ----------------------------------------------------------------------------- soups


@pytest.mark.slow
def test_greedy_soup_never_scores_below_its_best_ingredient(runs):
    ingredients = [runs(f"ft-{lr}") for lr in (0.4, 0.8, 1.6)]
    out = runs.root / "soup-greedy"
    proc = check(
        run_dtrain(["soup", *map(str, ingredients), "--method", "greedy", "--output", str(out)], cwd=runs.root)
    )
    report = json.loads((out / "soup.json").read_text())
    best = max(i["accuracy"] for i in report["ingredients"])
    print(proc.stdout.strip())
    assert report["soup"]["accuracy"] >= best
    proc = check(run_dtrain(["evaluate", str(out)], cwd=runs.root))  # a run folder: evaluate takes it
    assert f"accuracy={report['soup']['accuracy']:.6g}" in proc.stdout
    uniform = runs.root / "soup-uniform"
    check(
        run_dtrain(
            ["soup", *map(str, ingredients), "--method", "uniform", "--bn-batches", "0", "--output", str(uniform)],
            cwd=runs.root,
        )
    )
    mean = soup.mix([weights(i) for i in ingredients], [1, 1, 1])
    assert max_param_diff(weights(uniform), mean) <= 1e-6


@pytest.mark.slow
def test_weighted_soups_follow_their_weights_and_pruned_ingredients_keep_their_zeros(runs):
    ingredients = [str(runs(f"ft-{lr}")) for lr in (0.4, 0.8)]
    out = runs.root / "soup-weighted"
    soup.soup(ingredients, "weighted", out, bn_batches=0, weights=[1, 3])
    expected = soup.mix([weights(Path(i)) for i in ingredients], [1, 3])
    assert max_param_diff(weights(out), expected) <= 1e-6
    first = weights(Path(ingredients[0]))["fc.weight"]
    assert (
        max_param_diff(
            {"w": expected["fc.weight"]}, {"w": 0.25 * first + 0.75 * weights(Path(ingredients[1]))["fc.weight"]}
        )
        <= 1e-6
    )
    # Two pruned models with different masks: their soup is zero wherever either is.
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    a[0], b[:, 0] = 0, 0
    mixed = soup.mix([{"w.weight": a}, {"w.weight": b}], [1, 1])["w.weight"]
    assert (mixed[0] == 0).all() and (mixed[:, 0] == 0).all() and (mixed[1:, 1:] != 0).all()


@pytest.mark.slow
def test_interpolation_ends_are_the_runs_tracked_in_mlflow_and_another_architecture_is_refused(runs):
    a, b = runs("taught"), runs("alone")  # one architecture; the first was tracked, so is the line
    out = runs.root / "line"
    check(run_dtrain(["interpolate", str(a), str(b), "--alphas", "0,0.5,1", "--output", str(out)], cwd=runs.root))
    report = json.loads((out / "interpolation.json").read_text())
    ends = [p["accuracy"] for p in report["points"][::2]]
    assert ends == [evaluate(a), evaluate(b)] and (out / "interpolation.png").stat().st_size > 1000
    assert soup.line(weights(a)["fc.weight"], weights(b)["fc.weight"], 0.0).equal(weights(a)["fc.weight"])
    assert soup.line(weights(a)["fc.weight"], weights(b)["fc.weight"], 1.0).equal(weights(b)["fc.weight"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store(runs.root))
    found = client.search_runs(
        client.get_run(summary(a)["run_id"]).info.experiment_id, "tags.`dtrain.kind` = 'interpolate'"
    )
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    curve = client.get_metric_history(found[0].info.run_id, "eval/accuracy")
    assert [m.value for m in sorted(curve, key=lambda m: m.step)] == [p["accuracy"] for p in report["points"]]
    proc = run_dtrain(
        ["soup", str(runs("first")), str(runs("teacher")), "--output", str(runs.root / "no")], cwd=runs.root
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "has another architecture than the first" in proc.stderr and not (runs.root / "no").exists()
