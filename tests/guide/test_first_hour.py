"""A new user's first hour, scripted: the guide's task and recipe, taken from the guide's own
text into a fresh folder, run from another working directory through every command a first
day needs (train on 1 and 2 ranks, check (and a planted bug it catches), compare, search,
predict), each answering as the guide and the README say."""

import json
import os
import re

import numpy as np
import pytest
from helpers import ROOT, check, mlflow_store, run_dtrain

GUIDE = ROOT / "docs" / "guide.md"


def guide_code(name: str, lang: str) -> str:
    """The code block the guide shows for `examples/tabular/<name>`."""
    text = GUIDE.read_text()
    marker = f"<!-- guide-code: examples/tabular/{name} -->\n```{lang}\n"
    return text[text.index(marker) + len(marker) :].split("```", 1)[0]


@pytest.mark.slow
def test_a_new_user_walks_from_the_guide_to_a_tracked_checked_compared_searched_model(tmp_path):
    task, work = tmp_path / "mytask", tmp_path / "work"
    task.mkdir()
    work.mkdir()
    (task / "tabular_task.py").write_text(guide_code("tabular_task.py", "python"))
    (task / "recipe.yaml").write_text(guide_code("recipe.yaml", "yaml"))
    recipe, uri = "../mytask/recipe.yaml", mlflow_store(tmp_path)
    tracked = [f"tracking.uri={uri}"]

    # What the recipe sets and every key the task has, documented (the module found beside it).
    keys = check(run_dtrain(["keys", recipe], cwd=work)).stdout
    assert "model.hidden = 64" in keys and "Width of the two hidden layers." in keys

    # Train on 1 and on 2 ranks, as the README's first day writes it (no output_dir: the second
    # run finds the first in the recipe's runs/tabular and takes runs/tabular-2); the last line says where the
    # run went and how to see it. With
    # OMP_NUM_THREADS unset, as a new user has it, the host's cores are shared out alike: all of
    # them to 1 process, half to each of 2 ranks (torchrun alone would give each rank 1).
    cores, fresh = len(os.sched_getaffinity(0)), {"OMP_NUM_THREADS": None}
    one = check(run_dtrain(["train", recipe, *tracked], cwd=work, **fresh))
    assert one.stdout.strip().splitlines()[-1].startswith("done: 330 steps | eval rmse ")
    assert f"mlflow ui --backend-store-uri {uri}" in one.stdout
    assert f"ddp x1 (none, cpu, fp32, {cores} thread" in one.stdout, one.stdout
    two = check(run_dtrain(["train", recipe, *tracked, "--nproc-per-node", "2"], cwd=work, **fresh))
    assert "runs/tabular holds an earlier run; this one writes to runs/tabular-2" in two.stderr, two.stderr
    assert f"ddp x2 (gloo, cpu, fp32, {max(1, cores // 2)} thread" in two.stdout, two.stdout
    s = json.loads((work / "runs" / "tabular-2" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["eval"]["r2"] >= 0.3, s["eval"]  # the guide: 0.34 (linear regression 0.33)
    assert "rmse" in two.stdout

    # The two runs side by side: the same recipe at 1 and 2 ranks agrees.
    compared = check(
        run_dtrain(
            [
                "compare",
                "--experiment",
                "tabular",
                "--uri",
                uri,
                "--metric",
                "eval/r2",
                "--tolerance",
                "0.05",
                "--output",
                "compare",
            ],
            cwd=work,
        )
    )
    assert (work / "compare" / "comparison.png").exists() and "verdict: converges like the baseline" in compared.stdout

    # `dtrain check` passes the guide's task and catches a planted bug: the (N, 1) output against
    # (N,) targets, which MSE broadcasts to (N, N) (PyTorch only warns).
    assert (
        check(
            run_dtrain(["check", recipe, "--only", "overfit_batch,batch_independence", *tracked], cwd=work)
        ).returncode
        == 0
    )
    buggy = tmp_path / "buggy"
    buggy.mkdir()
    (buggy / "tabular_task.py").write_text(
        (task / "tabular_task.py").read_text().replace("F.mse_loss(model(x).squeeze(-1), y)", "F.mse_loss(model(x), y)")
    )
    (buggy / "recipe.yaml").write_text((task / "recipe.yaml").read_text())
    caught = run_dtrain(["check", "../buggy/recipe.yaml", "--only", "overfit_batch", *tracked], cwd=work)
    assert caught.returncode == 1 and re.search(r"^overfit_batch\s+FAIL", caught.stdout, re.M), caught.stdout

    # A small search over the LR: trials are runs of the recipe; best.yaml is a recipe.
    (work / "space.yaml").write_text("optim.lr: {type: categorical, choices: [0.001, 0.003]}\n")
    searched = check(
        run_dtrain(
            [
                "search",
                recipe,
                "train.epochs=3",
                *tracked,
                "--space",
                "space.yaml",
                "--sampler",
                "grid",
                "--trials",
                "2",
                "--metric",
                "eval/r2",
                "--output",
                "search",
            ],
            cwd=work,
        )
    )
    assert "search: 2 trials" in searched.stdout and (work / "search" / "best.yaml").exists()

    # Predictions from the 2-rank run's folder, on raw held-out features: the run's own R^2.
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    x, y = load_diabetes(return_X_y=True)
    _, xte, _, yte = train_test_split(x, y, test_size=0.2, random_state=0)
    np.save(work / "features.npy", xte.astype(np.float32))
    predict = ["predict", "runs/tabular-2", "features.npy", "--output", "pred.npy"]
    refused = run_dtrain(predict, cwd=work, PYTHONPATH=str(task))
    assert refused.returncode == 2 and "add --trust" in refused.stderr  # a run folder names no module of its own
    check(run_dtrain([*predict, "--trust"], cwd=work, PYTHONPATH=str(task)))
    pred = np.load(work / "pred.npy").astype(np.float64)
    r2 = 1 - ((pred - yte) ** 2).sum() / ((yte - yte.mean()) ** 2).sum()
    assert r2 == pytest.approx(s["eval"]["r2"], abs=1e-4)
