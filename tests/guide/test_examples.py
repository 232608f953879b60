"""The examples/ packages, each trained as its README says, on 2 CPU ranks, to a stated metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import CNN, ROOT, check, load_params, run_dtrain, write_image_folder

from dtrain.config import ConfigError
from dtrain.tasks import finetune

EXAMPLES = ROOT / "examples"


def run_example(name: str, tmp_path: Path, *overrides: str, nproc: int = 2):
    """`torchrun -m dtrain train recipe.yaml ...` from the example's folder, as its README runs it."""
    return run_dtrain(
        ["train", "recipe.yaml", "tracking.enabled=false", f"output_dir={tmp_path / name}", *overrides],
        cwd=EXAMPLES / name,
        nproc=nproc,
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A digits CNN trained briefly (60 steps at a high LR: ~70 % on 10 classes)."""
    out = tmp_path_factory.mktemp("pretrained")
    check(
        run_dtrain(
            [
                "train",
                CNN,
                "train.max_steps=60",
                "optim.lr=0.8",
                "optim.warmup_steps=5",
                "tracking.enabled=false",
                "checkpoint.every_steps=0",
                "train.eval_every_steps=0",
                f"output_dir={out}",
            ],
            cwd=out,
        )
    )
    return out


@pytest.mark.slow
def test_finetune_example_keeps_the_frozen_layers_bit_identical(pretrained, tmp_path):
    proc = check(run_example("finetune", tmp_path, f"model.init_from={pretrained}"))
    # The 10-way head has no place in the 2-way model: reported, kept at its init.
    assert (
        "loaded 60 of 62 tensors (weights only); new shape, kept at init: fc.weight [10, 64]->[2, 64], "
        "fc.bias [10]->[2]" in proc.stdout
    )
    before, after = load_params(pretrained / "model.pt"), load_params(tmp_path / "finetune" / "model.pt")
    frozen = [
        k
        for k in after
        if k.startswith(("stem.", "layers.0.", "layers.1.")) and "running" not in k and "num_batches" not in k
    ]
    trained = [k for k in after if k.startswith(("layers.2.", "layers.3.")) and k.endswith("weight")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)  # what freezing is compared against
    s = json.loads((tmp_path / "finetune" / "summary.json").read_text())
    assert s["eval"]["accuracy"] >= 0.9, s["eval"]  # odd/even of held-out digits


def test_init_from_and_freeze_name_what_is_wrong(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="model.init_from.*no such file"):
        finetune.init_from(model, str(tmp_path / "missing"))
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="no tensor matches the model by name and shape"):
        finetune.init_from(model, str(tmp_path))
    torch.save({"0.weight": torch.ones(4, 4), "2.weight": torch.ones(1)}, tmp_path / "model.pt")
    report = finetune.init_from(model, str(tmp_path / "model.pt"))
    assert "loaded 1 of 4" in report and "in the file, unused: 2.weight" in report and "kept at init: 0.bias" in report
    assert torch.equal(model[0].weight, torch.ones(4, 4))
    with pytest.raises(ConfigError, match="model.freeze.*names no parameter; the model's modules are 0, 1"):
        finetune.freeze(model, ["2"])
    with pytest.raises(ConfigError, match="freezes every parameter"):
        finetune.freeze(model, ["0", "1"])
    assert finetune.freeze(model, ["0"]) == 2 and not model[0].weight.requires_grad and model[1].weight.requires_grad


def test_bad_init_from_is_one_line(tmp_path):
    proc = run_dtrain(
        ["train", CNN, "model.init_from=nowhere/model.pt", "tracking.enabled=false", f"output_dir={tmp_path / 'x'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "model.init_from" in proc.stderr and "no such file" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_image_folder_example_trains_a_torchvision_model_from_lazy_files(tmp_path):
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        pytest.skip(
            'torchvision is not installed (pip install -e ".[vision]"; launchers/setup.sh keeps it only where '
            "it imports beside this torch: PyPI's CUDA build does not beside a CPU-only torch)"
        )
    images = write_image_folder(tmp_path / "images", classes=3, per_class=40, size=40)
    check(run_example("image_folder", tmp_path, f"data.path={images}"))
    s = json.loads((tmp_path / "image_folder" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 30 and s["eval"]["samples"] == 24
    assert s["eval"]["accuracy"] >= 0.9, s["eval"]  # 3 classes, held-out images


def test_the_guide_shows_the_tabular_example_verbatim():
    """docs/guide.md's task and recipe are the files the test below trains: a guide that cannot drift."""
    guide = (ROOT / "docs" / "guide.md").read_text()
    for name, lang in (("tabular_task.py", "python"), ("recipe.yaml", "yaml")):
        marker = f"<!-- guide-code: examples/tabular/{name} -->\n```{lang}\n"
        shown = guide[guide.index(marker) + len(marker) :].split("```", 1)[0]
        assert shown == (EXAMPLES / "tabular" / name).read_text()


def test_a_dataset_workers_cannot_receive_is_named_in_one_line(tmp_path):
    """Workers start from a forkserver (data.py says why), so the dataset travels by pickle:
    one a pickle cannot carry is a config error naming the key, not a pickling traceback."""
    import shutil

    shutil.copytree(EXAMPLES / "tabular", tmp_path / "tabular")
    with (tmp_path / "tabular" / "tabular_task.py").open("a") as f:
        f.write(
            "\n\nclass WithLambda(DiabetesTask):\n    def datasets(self):\n"
            "        train, val = super().datasets()\n        train.transform = lambda x: x\n"
            "        return train, val\n"
        )
    proc = run_dtrain(
        [
            "train",
            "recipe.yaml",
            "task=tabular_task:WithLambda",
            "data.num_workers=1",
            "train.max_steps=2",
            "tracking.enabled=false",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path / "tabular",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "data.num_workers=1: the dataset cannot be sent to worker processes" in last, last
    assert "or use 0" in last


def test_keep_best_on_a_task_without_its_headline_metric_is_refused_before_training(tmp_path):
    proc = run_dtrain(
        [
            "train",
            "recipe.yaml",
            "checkpoint.keep_best=true",
            "train.max_steps=2",
            "tracking.enabled=false",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=EXAMPLES / "tabular",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "checkpoint.keep_best (the task's headline_metric())='loss': not an eval metric of this task; "
            "it reports mae, r2, rmse"
        )
    )
    assert not (tmp_path / "out" / "checkpoints").exists()
