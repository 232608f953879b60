"""Token files (`dtrain prepare-text`, `data.tokens`): the same samples as the in-memory
reader, memory-mapped in DataLoader workers, and an exact mid-epoch resume on 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LM, check, load_params, max_param_diff, run_dtrain

from dtrain.data import tokens
from dtrain.tasks.transformer import Blocks, Vocab, read_text

CORPUS = Path(json.__file__).parent  # the stdlib's json package: ~100 kB of text on every machine


def test_prepare_text_gives_the_in_memory_readers_samples(tmp_path):
    proc = check(
        run_dtrain(
            ["prepare-text", str(CORPUS), "--output", str(tmp_path / "tok"), "--val-fraction", "0.2"], cwd=tmp_path
        )
    )
    assert "train with data.tokens=" in proc.stdout
    meta = tokens.read_meta(tmp_path / "tok")
    text = read_text(CORPUS, 0)
    split = meta["train_tokens"]
    assert split + meta["val_tokens"] == len(text) and split == int(len(text) * 0.8)
    vocab = Vocab(meta["vocab"][1:])
    assert vocab.chars == Vocab.from_text(text).chars and meta["dtype"] == "uint16"
    on_disk = tokens.TokenBlocks(tmp_path / "tok" / "train.bin", meta["dtype"], 16)
    in_memory = Blocks(vocab.encode(text[:split]), 16)
    assert len(on_disk) == len(in_memory)
    for i in (0, 1, 777, len(in_memory) - 1):
        assert all(torch.equal(a, b) for a, b in zip(on_disk[i], in_memory[i]))
    val = np.fromfile(tmp_path / "tok" / "val.bin", dtype=np.uint16)
    assert vocab.decode(val.tolist()) == text[split:]


@pytest.mark.slow
def test_token_file_lm_resumes_exactly_mid_epoch(tmp_path):
    check(run_dtrain(["prepare-text", str(CORPUS), "--output", str(tmp_path / "tok")], cwd=tmp_path))
    common = [
        f"data.tokens={tmp_path / 'tok'}",
        "train.max_steps=10",
        "tracking.enabled=false",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.block_size=32",
        "data.global_batch_size=16",
        "train.eval_every_steps=0",
        "data.eval_blocks=8",
    ]
    check(
        run_dtrain(
            [
                "train",
                LM,
                *common,
                "data.num_workers=2",
                "checkpoint.every_steps=0",
                f"output_dir={tmp_path / 'straight'}",
            ],
            cwd=tmp_path,
            nproc=2,
        )
    )
    resumed = [*common, "checkpoint.every_steps=4", f"output_dir={tmp_path / 'resumed'}"]
    check(run_dtrain(["train", LM, *resumed, "train.stop_at_step=4"], cwd=tmp_path, nproc=2))
    proc = check(run_dtrain(["train", LM, *resumed, "resume=auto"], cwd=tmp_path, nproc=2))
    assert "resumed at step 4" in proc.stdout  # an epoch here is ~5,600 steps: mid-epoch
    straight, final = load_params(tmp_path / "straight" / "model.pt"), load_params(tmp_path / "resumed" / "model.pt")
    assert max_param_diff(straight, final) < 1e-6
    step8 = torch.load(
        tmp_path / "resumed" / "checkpoints" / "step_00000008" / "model" / "state.pt", weights_only=True
    )["model"]
    assert max_param_diff(final, step8) > 1e-4  # what the bound would catch: two steps fewer


def test_missing_token_folder_is_one_line(tmp_path):
    proc = run_dtrain(["train", LM, f"data.tokens={tmp_path / 'none'}", "tracking.enabled=false"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.tokens" in proc.stderr and "has no train.bin" in proc.stderr and "prepare-text" in proc.stderr


def nanogpt_char_folder(folder: Path, text: str) -> dict:
    """What nanoGPT's data/shakespeare_char/prepare.py writes: uint16 ids from 0, meta.pkl."""
    import pickle

    chars = sorted(set(text))
    stoi, itos = {ch: i for i, ch in enumerate(chars)}, {i: ch for i, ch in enumerate(chars)}
    folder.mkdir()
    n = int(len(text) * 0.9)
    np.array([stoi[c] for c in text[:n]], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in text[n:]], dtype=np.uint16).tofile(folder / "val.bin")
    meta = {"vocab_size": len(chars), "itos": itos, "stoi": stoi}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return meta


def test_nanogpts_own_character_folder_trains_as_it_is(tmp_path):
    """Ids as nanoGPT wrote them (no slot added), its meta.pkl read without building any class,
    and `dtrain sample` decoding with its characters."""
    text = read_text(CORPUS, 60_000)
    meta = nanogpt_char_folder(tmp_path / "shakespeare_char", text)
    data = tokens.load(tmp_path / "shakespeare_char", 16, 4)  # what any task gets
    assert (
        data.vocab_size == meta["vocab_size"]
        and not data.unk
        and data.chars == [meta["itos"][i] for i in range(meta["vocab_size"])]
    )
    x, y = data.train[5]
    assert "".join(meta["itos"][int(i)] for i in x) == text[5:21] and torch.equal(x[1:], y[:-1])
    out = tmp_path / "run"
    check(
        run_dtrain(
            [
                "train",
                LM,
                f"data.tokens={tmp_path / 'shakespeare_char'}",
                "train.max_steps=5",
                "tracking.enabled=false",
                "model.n_layer=1",
                "model.n_embd=32",
                "model.block_size=32",
                "data.global_batch_size=16",
                "data.eval_blocks=8",
                f"output_dir={out}",
            ],
            cwd=tmp_path,
        )
    )
    assert json.loads((out / "summary.json").read_text())["vocab_size"] == meta["vocab_size"]
    sampled = check(run_dtrain(["sample", str(out), "--prompt", "def", "--tokens", "40"], cwd=tmp_path)).stdout
    assert set(sampled.rstrip("\n")) <= set(text)


def test_a_crafted_meta_pkl_runs_nothing_and_is_one_line(tmp_path):
    import pickle

    folder = tmp_path / "crafted"
    nanogpt_char_folder(folder, "abcabcabc" * 100)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": Payload(), "stoi": {}}))
    proc = run_dtrain(
        ["train", LM, f"data.tokens={folder}", "tracking.enabled=false", "model.block_size=8"], cwd=tmp_path
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not marker.exists()
    assert "meta.pkl is not nanoGPT's character metadata" in proc.stderr and "pathlib" in proc.stderr, proc.stderr


def test_bpe_ids_without_metadata_need_their_vocabulary_size(tmp_path):
    """nanoGPT's openwebtext prepare.py writes GPT-2 BPE ids and no metadata."""
    folder = tmp_path / "bpe"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 4000), ("val.bin", 600)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(folder / name)
    with pytest.raises(tokens.ConfigError, match="give data.vocab_size"):
        tokens.load(folder, 32, 4)
    data = tokens.load(folder, 32, 4, vocab_size=50257)
    assert data.vocab_size == 50257 and data.chars is None and len(data.val) == 4
    assert tokens.Vocab.of(data).decode([464, 3290]) == "<464><3290>"
