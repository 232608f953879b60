"""`dtrain sample RUN --prompt TEXT`: what a trained run generates (a task with `generate_text`:
the character LM)."""

from __future__ import annotations

import argparse
from typing import Any

from dtrain.cli.options import trust_option


def add(sub: Any) -> None:
    s = sub.add_parser("sample", help="generate text from a trained transformer run")
    s.add_argument("run", help="the run's output_dir (holds config.yaml, model.pt, vocab.json)")
    s.add_argument("--prompt", default="def ", help="text to continue")
    s.add_argument("--tokens", type=int, default=300, help="characters to generate")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    trust_option(s)
    s.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dtrain.errors import ConfigError
    from dtrain.tasks import get_task
    from dtrain.train.config import load_config

    out = Path(args.run)
    cfg = load_config(out / "config.yaml", trust=args.trust)
    task = get_task(cfg.task)(cfg)
    generate = getattr(task, "generate_text", None)  # optional: only a task that generates text has it
    if generate is None:
        raise ConfigError(
            "run", str(out), f"is a {cfg.task} run; sample needs a task that generates text (transformer)"
        )
    print(generate(out, args.prompt, args.tokens, args.temperature, args.top_k, args.seed))
