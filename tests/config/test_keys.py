"""`dtrain keys`: every key of a recipe's task, with its value, type, default and docstring."""

import pytest
from helpers import ROOT, check, run_dtrain

from dtrain.config import keys
from dtrain.train.config import load_config

RECIPES = ["cnn_digits", "transformer_charlm", "gan_ring"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_key_of_every_shipped_task_documents_itself(recipe):
    rows = keys.keys(load_config(ROOT / "recipes" / f"{recipe}.yaml"))
    assert len(rows) > 90 and not [k.key for k in rows if not k.doc]  # a new key without a docstring fails
    assert len({k.key for k in rows}) == len(rows)


def test_the_listing_shows_the_recipes_values_and_the_defaults(tmp_path):
    proc = check(
        run_dtrain(
            ["keys", str(ROOT / "recipes" / "cnn_digits.yaml"), "checkpoint.async=true", "--changed"], cwd=tmp_path
        )
    )
    out = proc.stdout
    assert "optim.lr = 0.2   [float]   (default 0.1)\n    Peak learning rate" in out
    assert "checkpoint.async = True   [bool]   (default False)" in out  # the keyword field, by its key
    assert "compile = " not in out  # --changed: only what the recipe sets or changes
    # A key the recipe states at its default value stays in the listing, and says so.
    assert "engine = 'ddp'   [ddp|deepspeed|fsdp]   (set, equal to the default)" in out  # the recipe's `engine: ddp`
    stated = check(
        run_dtrain(["keys", str(ROOT / "recipes" / "cnn_digits.yaml"), "compile=false", "--changed"], cwd=tmp_path)
    ).stdout
    assert "compile = False   [bool]   (set, equal to the default)" in stated
    full = check(run_dtrain(["keys", str(ROOT / "recipes" / "cnn_digits.yaml")], cwd=tmp_path)).stdout
    assert "engine = 'ddp'   [ddp|deepspeed|fsdp]" in full and "model.zero_init_residual = True" in full
