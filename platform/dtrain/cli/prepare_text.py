"""`dtrain prepare-text FILES... --output DIR`: text encoded into a token folder for `data.tokens`
(streamed: any size; `dtrain.data.tokens`)."""

from __future__ import annotations

import argparse
from typing import Any


def add(sub: Any) -> None:
    t = sub.add_parser("prepare-text", help="encode text files into train.bin / val.bin for data.tokens")
    t.add_argument("inputs", nargs="+", help="text files or folders (their text files, in sorted order)")
    t.add_argument("--output", required=True, help="the token folder (train.bin, val.bin, meta.json)")
    t.add_argument("--val-fraction", type=float, default=0.1, help="the last part of the text held out")
    t.add_argument("--max-chars", type=int, default=0, help="stop after this many characters (0: all)")
    t.add_argument(
        "--tokenizer",
        default="",
        help="a Hugging Face tokenizer saved locally (folder or tokenizer.json) "
        "to encode with, instead of a character vocabulary (the hf extra)",
    )
    t.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    import sys
    from pathlib import Path

    from dtrain.data import tokens
    from dtrain.errors import WorkFailed

    try:
        meta = tokens.prepare(
            args.inputs,
            Path(args.output),
            args.val_fraction,
            args.max_chars,
            show_progress=sys.stderr.isatty(),
            tokenizer=args.tokenizer,
        )
    except OSError as e:  # an unwritable folder, a full disk: the temporary files are already removed
        raise WorkFailed(f"prepare-text: {e.filename or args.output}: {e.strerror or e}") from None
    print(
        f"prepare-text: {len(meta['sources'])} file(s), {meta['train_tokens']:,} train + {meta['val_tokens']:,} val "
        f"tokens ({meta['dtype']}, {meta.get('vocab_size') or len(meta['vocab'])} symbols) -> {args.output}; "
        f"train with data.tokens={args.output}"
    )
