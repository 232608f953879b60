"""Train a small byte-level BPE tokenizer on local text with the `tokenizers` package and save
it as transformers saves one (tokenizer.json + tokenizer_config.json): what
`dtrain prepare-text --tokenizer` and `data.tokenizer` read. A tokenizer of your own saved with
`save_pretrained` works the same; nothing here is downloaded.

    python make_tokenizer.py TEXT_FILES_OR_FOLDERS... --output tokenizer [--vocab-size 2048]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def make_tokenizer(folder: Path, text_files: list[str], vocab_size: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train(
        text_files,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<unk>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    ).save_pretrained(str(folder))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="+")
    p.add_argument("--output", required=True)
    p.add_argument("--vocab-size", type=int, default=2048)
    args = p.parse_args()
    from dtrain.data.tokens import TEXT_SUFFIXES, text_files  # a folder's text files, as prepare-text reads them

    make_tokenizer(Path(args.output), [str(f) for f in text_files(args.text, TEXT_SUFFIXES)], args.vocab_size)
    print(f"tokenizer ({args.vocab_size} ids) -> {args.output}")
