"""`dtrain interpolate A B --output DIR`: the held-out metric along the line between two runs'
weights (do they share a basin? `dtrain.postrun.soup`)."""

from __future__ import annotations

import argparse
from typing import Any

from dtrain.cli.options import floats, mixing_options


def add(sub: Any) -> None:
    i = sub.add_parser("interpolate", help="evaluate the weights on the line between two runs (do they share a basin?)")
    i.add_argument("a")
    i.add_argument("b")
    i.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", help="comma-separated, 0: A, 1: B")
    mixing_options(i, "folder for interpolation.json and interpolation.png")
    i.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dtrain.errors import ConfigError
    from dtrain.postrun import soup

    alphas = floats("--alphas", args.alphas)
    if len(alphas) < 2 or alphas != sorted(alphas):
        raise ConfigError("--alphas", args.alphas, "two or more increasing values (0: A, 1: B)")
    out = soup.interpolate(args.a, args.b, alphas, Path(args.output), args.bn_batches, args.trust)
    m = out["metric"]
    curve = " ".join(f"{p['alpha']:g}:{p[m]:.4g}" for p in out["points"])
    print(f"interpolate {m}: {curve} | barrier {out['barrier']:.4g} -> {args.output}/interpolation.png")
