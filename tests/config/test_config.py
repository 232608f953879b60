"""Recipes, overrides and bad input: one line naming the key, non-zero exit, no traceback."""

from __future__ import annotations

import re

import pytest
from helpers import ROOT, run_dtrain

from dtrain import cli
from dtrain.config import ConfigError, recipe
from dtrain.tasks.cnn import CNNConfig
from dtrain.train.config import load_config

RECIPE = str(ROOT / "recipes" / "cnn_digits.yaml")


def test_recipe_and_overrides_are_typed():
    cfg = load_config(
        RECIPE,
        [
            "optim.lr=1e-3",
            "data.global_batch_size=128",
            "model.sync_bn=false",
            "optim.betas=[0.5, 0.99]",
            "optim.milestones=[10,20]",
            "precision=bf16",
        ],
    )
    assert isinstance(cfg, CNNConfig)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # PyYAML reads 1e-3 as a string
    assert cfg.data.global_batch_size == 128 and cfg.model.sync_bn is False
    assert cfg.optim.betas == (0.5, 0.99) and cfg.optim.milestones == [10, 20]
    assert cfg.precision == "bf16" and cfg.recipe == "cnn_digits" and cfg.output_dir == "runs/cnn_digits"


def test_required_keys_exist():
    cfg = load_config(RECIPE)
    for key in [
        "task",
        "seed",
        "engine",
        "precision",
        "output_dir",
        "resume",
        "data.global_batch_size",
        "data.path",
        "train.max_steps",
        "train.epochs",
        "model.sync_bn",
        "optim.name",
        "optim.lr",
        "optim.base_batch_size",
        "optim.scale_rule",
        "optim.warmup_steps",
        "optim.schedule",
        "optim.weight_decay",
        "optim.clip_grad_norm",
        "optim.clip_grad_value",
        "tracking.uri",
        "tracking.experiment",
        "checkpoint.every_steps",
    ]:
        node = cfg
        for part in key.split("."):
            assert hasattr(node, part), key  # a key renamed or dropped fails here
            node = getattr(node, part)
        flat = recipe.flatten(recipe.to_dict(cfg))
        assert key in flat or any(k.startswith(key + ".") for k in flat), key  # and reaches MLflow's params


BAD = [
    (["optim.lrr=0.1"], "optim.lrr=0.1: unknown key; did you mean optim.lr?"),
    (["optim.lr=-0.1"], "optim.lr=-0.1: must be > 0"),
    (["optim.lr=fast"], "optim.lr='fast': must be a number"),
    (["data.global_batch_size=0"], "data.global_batch_size=0: must be > 0"),
    (["data.global_batch_size=6.5"], "data.global_batch_size=6.5: must be an integer"),
    (
        ["optim.name=adamm"],
        "optim.name='adamm': must be one of sgd|adam|adamw|rmsprop|adagrad|adafactor|lars|lamb|schedulefree_adamw|"
        "schedulefree_sgd (did you mean adam?)",
    ),
    (["precision=fp8"], "precision='fp8': must be one of fp32|bf16|fp16"),
    (["model.sync_bn=maybe"], "model.sync_bn='maybe': must be true or false"),
    (["data.path=/no/such/dir"], "data.path='/no/such/dir': no such file or folder"),
    (["resume=/no/such/ckpt"], "resume='/no/such/ckpt': no such checkpoint"),
    (
        ["data.global_batch_size=63"],
        "data.global_batch_size=63: must be divisible by world size x data.grad_accum_steps = 1 x 2",
    ),
    (
        ["task=cnnn"],
        "task='cnnn': must be one of cnn|transformer|gan|hf_causal_lm|hf_sequence_classification or "
        "package.module:Class (did you mean cnn?)",
    ),
    (["optim"], "override 'optim' is not of the form key.sub=value"),
    (["train.max_steps=.inf"], "train.max_steps=inf: must be an integer"),  # was an OverflowError traceback
    (["optim.lr=.nan"], "optim.lr=nan: must be a number"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_input_one_line(overrides, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "divisible" in message:
        overrides = overrides + ["data.grad_accum_steps=2"]
    with pytest.raises(SystemExit) as e:
        cli.main(["train", RECIPE, *overrides])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dtrain: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # nothing half-written


def test_an_image_folder_with_an_empty_class_is_one_line(tmp_path, capsys, monkeypatch):
    """It was scikit-learn's ValueError traceback about an empty train set."""
    monkeypatch.chdir(tmp_path)
    for cls in ("cats", "dogs"):
        (tmp_path / "images" / cls).mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", RECIPE, f"data.path={tmp_path / 'images'}", "tracking.enabled=false"])
    line = capsys.readouterr().err.strip()
    assert e.value.code == 2 and line.startswith(
        f"dtrain: error: data.path='{tmp_path / 'images' / 'cats'}': holds no image (.bmp"
    ), line


def test_prepare_text_into_a_place_it_cannot_write_is_one_line(capsys):
    """It was a FileNotFoundError / PermissionError traceback."""
    for output in ("/proc/dtrain-tokens", "/sys/kernel/dtrain-tokens"):  # no such place; not permitted, even to root
        with pytest.raises(SystemExit) as e:
            cli.main(["prepare-text", str(ROOT / "README.md"), "--output", output])
        line = capsys.readouterr().err.strip()
        assert e.value.code == 2 and line.startswith(f"dtrain: error: --output='{output}': cannot be created: "), line


def test_missing_and_malformed_recipe(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err.strip()
    assert (
        e.value.code == 2
        and err.startswith("dtrain: error: recipe=")
        and err.endswith("no such file (pass a YAML recipe, e.g. recipes/cnn_digits.yaml)")
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: cnn\noptim:\n  lr: [0.1\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", str(bad)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "malformed YAML at line" in err
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(scalar)


def test_bad_input_multi_rank_launch_is_one_line(tmp_path):
    """`dtrain train --nproc-per-node 2` validates before torchrun starts any rank."""
    proc = run_dtrain(["train", RECIPE, "--nproc-per-node", "2", "data.global_batch_size=63"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "dtrain: error: data.global_batch_size=63: must be divisible by world size x "
        "data.grad_accum_steps = 2 x 1 (the nearest: 62 or 64)"
    ), proc.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_input_under_raw_torchrun(tmp_path):
    """Under a bare torchrun every rank refuses before training; only rank 0 prints our line,
    and the agent's failure report, the last thing printed, names it as the root cause (the
    rank's error file) instead of torchrun's own "To enable traceback see" line."""
    proc = run_dtrain(["train", RECIPE, "optim.lr=-1"], cwd=tmp_path, nproc=2, warm=False)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("dtrain:") or line.startswith("dtrain[")]
    assert ours == ["dtrain: error: optim.lr=-1.0: must be > 0"], proc.stderr
    assert "exitcode  : 2" in proc.stderr and not (tmp_path / "runs").exists()
    root_cause = proc.stderr[proc.stderr.index("Root Cause") :]  # the rank that failed first: either
    assert re.search(r"traceback : dtrain(\[rank 1\])?: error: optim.lr=-1.0: must be > 0\n", root_cause), proc.stderr
    assert "new message format" not in proc.stderr  # the file is in the layout torch's `record` writes


def test_the_schema_and_recipe_loading_import_no_torch():
    """`dtrain --version`, `--help` and a bad recipe answer before torch loads (and a config can
    be read and type-checked without it). The probe sees torch where a module does import it."""
    import subprocess
    import sys

    probe = "import sys, {}; print('torch' in sys.modules)"
    light = "dtrain.config, dtrain.config.recipe, dtrain.protocols, dtrain.runtime.environments, dtrain.cli"

    def run(mods: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", probe.format(mods)], capture_output=True, text=True, check=True
        ).stdout.strip()

    assert run(light) == "False"
    assert run("dtrain.data") == "True"


def test_a_refused_combination_costs_no_rank_start_up(tmp_path):
    """The engine's refusal comes from the one process `dtrain train --nproc-per-node` runs
    before torchrun: no torchrun agent starts (its ChildFailedError report would follow)."""
    proc = run_dtrain(
        [
            "train",
            RECIPE,
            "engine=deepspeed",
            "optim.name=schedulefree_adamw",
            "optim.schedule=constant",
            "optim.nesterov=false",
            "--nproc-per-node",
            "2",
            "tracking.enabled=false",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "dtrain: error: optim.name='schedulefree_adamw': not with engine=deepspeed (its averaged weights need the "
        "optimizer's train/eval switch, which DeepSpeed's wrapper hides); use engine=ddp"
    ), proc.stderr
    assert "torch.distributed" not in proc.stderr and not (tmp_path / "runs").exists()


def test_a_relative_data_path_is_found_beside_the_recipe_like_its_task_module(tmp_path, monkeypatch):
    """`dtrain train mytask/recipe.yaml` from the folder above: `data.path: data` is mytask/data,
    as `task: mymodule:Task` is mytask/mymodule.py (it used to be looked for in the working
    directory only, and the error did not say where it looked)."""
    (tmp_path / "mytask" / "data").mkdir(parents=True)
    (tmp_path / "mytask" / "recipe.yaml").write_text("task: cnn\ndata:\n  path: data\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("mytask/recipe.yaml").data.path == str(tmp_path / "mytask" / "data")
    (tmp_path / "data").mkdir()  # the working directory's comes first, and stays as written
    assert load_config("mytask/recipe.yaml").data.path == "data"
    with pytest.raises(ConfigError) as e:
        load_config("mytask/recipe.yaml", ["data.path=nope"])
    assert str(e.value) == f"data.path='nope': no such file or folder (looked in {tmp_path} and beside the recipe)"
