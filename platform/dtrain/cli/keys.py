"""`dtrain keys RECIPE [--changed]`: every key of the recipe's task and features, with the value the
recipe gives it, its type, its default and what it does (`dtrain.config.keys`)."""

from __future__ import annotations

import argparse
from typing import Any


def add(sub: Any) -> None:
    k = sub.add_parser("keys", help="every key of a recipe's task: value, type, default, what it does")
    k.add_argument("recipe")
    k.add_argument("overrides", nargs="*")
    k.add_argument(
        "--changed", action="store_true", help="only the keys the recipe sets (or whose value is not the default)"
    )
    k.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from dtrain.config import keys, recipe
    from dtrain.train.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    given = keys.set_paths(recipe.read_raw(args.recipe, args.overrides)) - {"recipe"}  # the loader names it
    print(keys.render(keys.keys(cfg), changed_only=args.changed, given=given))
