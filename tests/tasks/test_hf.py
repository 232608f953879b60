"""Hugging Face `transformers` models as dtrain tasks, on 2 CPU ranks, nothing downloaded.

A small BPE tokenizer is trained here with the `tokenizers` package on local text and saved; a
Llama-style and a GPT-2 model are built from configs with random weights. The Llama trains on a
token folder that `dtrain prepare-text --tokenizer` wrote, under DDP, FSDP2 (its decoder layers
as units, found from the model) with activation checkpointing, FSDP2 compiled, and DeepSpeed
ZeRO-3: the same parameters. The GPT-2 trains on a Parquet table tokenised per sample, leaves
as a `save_pretrained` folder that `from_pretrained` loads unchanged, and is fine-tuned from
that folder as a sequence classifier.
"""

from __future__ import annotations

import json
import os
import random
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import check, max_param_diff, run_dtrain, spawn, trained_once

from dtrain.checkpoint import safeload
from dtrain.config import ConfigError
from dtrain.data import tokens
from dtrain.postrun.predict import predict_file
from dtrain.runtime import optional
from dtrain.tasks import get_task
from dtrain.train.config import load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_causal_lm"
pytest.importorskip("transformers", reason='transformers is not installed (pip install -e ".[hf]")')
pytest.importorskip("datasets", reason='datasets is not installed (pip install -e ".[hf]")')
# Through dtrain's import, as the tasks do: PyPI's torchvision beside this CPU torch fails to
# import on its own, and transformers imports torchvision when it is installed.
transformers = optional.transformers("tests", "test_hf")
sys.path.insert(0, str(EXAMPLE))
from make_tokenizer import make_tokenizer  # noqa: E402  (the example's own, as a user runs it)

RECIPE = str(EXAMPLE / "recipe.yaml")
CLASSIFY = str(EXAMPLE / "classify.yaml")  # fine-tunes what recipe.yaml trained (its hf/ folder)
LLAMA = (
    "model.config={model_type: llama, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, "
    "hidden_size: 64, intermediate_size: 128, max_position_embeddings: 64}"
)
GPT2 = "model.config={model_type: gpt2, n_layer: 2, n_head: 2, n_embd: 64, n_positions: 64}"
BASE = [
    "model.block_size=32",
    "data.global_batch_size=8",
    "train.max_steps=8",
    "train.eval_every_steps=0",
    "optim.warmup_steps=2",
    "optim.lr=0.003",
    "tracking.enabled=false",
    "checkpoint.every_steps=0",
    "data.eval_blocks=16",
]
TWO_RANKS: list[tuple[str, tuple[str, ...]]] = [
    ("ddp", (LLAMA, "data.tokens={root}/tokens")),
    ("ddp-7", (LLAMA, "data.tokens={root}/tokens", "train.max_steps=7")),  # one step short: what a bound must exclude
    ("fsdp-ac", (LLAMA, "data.tokens={root}/tokens", "engine=fsdp", "model.activation_checkpointing=full")),
    ("zero3", (LLAMA, "data.tokens={root}/tokens", "engine=deepspeed", "deepspeed.zero_stage=3")),
    ("fsdp-compiled", (LLAMA, "data.tokens={root}/tokens", "engine=fsdp", "compile=true")),
    # Stopped after step 4 and resumed (the tokenizer's ids, the step, the data position).
    (
        "fsdp-resumed",
        (
            LLAMA,
            "data.tokens={root}/tokens",
            "engine=fsdp",
            "model.activation_checkpointing=full",
            "train.stop_at_step=4",
            "checkpoint.every_steps=4",
        ),
    ),
    (
        "fsdp-resumed",
        (
            LLAMA,
            "data.tokens={root}/tokens",
            "engine=fsdp",
            "model.activation_checkpointing=full",
            "resume=auto",
            "checkpoint.every_steps=4",
        ),
    ),
    ("fsdp-bf16", (LLAMA, "data.tokens={root}/tokens", "engine=fsdp", "precision=bf16")),
    (
        "gpt2",
        (
            GPT2,
            "data.tokens=",
            "data.path={root}/text.parquet",
            "data.tokenizer={root}/tokenizer",
            "train.max_steps=12",
        ),
    ),
    (
        "classifier",
        (
            "model.pretrained={root}/gpt2/hf",
            "data.path={root}/labelled.parquet",
            "data.tokenizer={root}/gpt2/hf",
            "train.max_steps=30",
            "optim.lr=0.001",
            "data.global_batch_size=16",
        ),
    ),
]


def make_tables(root: Path, lines: list[str]) -> None:
    """text.parquet (lines of code) and labelled.parquet (two vocabularies, one per label)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": t} for t in lines]), root / "text.parquet")
    rng = random.Random(0)
    words = [["alpha", "beta", "gamma"], ["delta", "omega", "sigma"]]
    rows = [
        {"text": " ".join(rng.choice(words[i % 2]) for _ in range(rng.randint(3, 10))), "label": i % 2}
        for i in range(320)
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "labelled.parquet")


def _train(rank: int, world: int, root: str) -> None:
    from dtrain.runtime.distributed import DistEnv
    from dtrain.train.fit import fit

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    for name, overrides in TWO_RANKS:
        recipe = CLASSIFY if name == "classifier" else RECIPE
        cfg = load_config(recipe, [*BASE, f"output_dir={root}/{name}", *(o.replace("{root}", root) for o in overrides)])
        outcome = fit(cfg, DistEnv(rank=rank, world_size=world, local_world_size=world), torch.device("cpu"))
        assert outcome.status in ("finished", "stopped"), (name, outcome)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder of each run above, trained once per session."""

    def train(root: Path) -> None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        sources = [str(stdlib / "json" / f) for f in ("decoder.py", "encoder.py", "__init__.py")]
        make_tokenizer(root / "tokenizer", sources)
        check(
            run_dtrain(
                ["prepare-text", *sources, "--tokenizer", str(root / "tokenizer"), "--output", str(root / "tokens")],
                cwd=root,
            )
        )
        make_tables(root, [line for f in sources for line in Path(f).read_text().splitlines() if line.strip()])
        spawn(_train, 2, str(root))

    return trained_once(tmp_path_factory, "hf", train)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return safeload.load_weights(run / "model.safetensors")


# ------------------------------------------------------------------ models and engines


@pytest.mark.slow
def test_fsdp_with_activation_checkpointing_zero3_compile_and_a_resume_train_the_llama_to_ddps_parameters(runs):
    ddp = weights(runs / "ddp")
    assert max_param_diff(weights(runs / "fsdp-ac"), ddp) <= 1e-5
    assert max_param_diff(weights(runs / "zero3"), ddp) <= 1e-5
    assert max_param_diff(weights(runs / "fsdp-compiled"), ddp) <= 1e-4  # inductor's own kernels round differently
    assert max_param_diff(weights(runs / "fsdp-resumed"), weights(runs / "fsdp-ac")) <= 1e-6
    bf16 = json.loads((runs / "fsdp-bf16" / "summary.json").read_text())
    assert (
        bf16["precision"] == "bf16"
        and abs(bf16["eval"]["loss"] - json.loads((runs / "ddp" / "summary.json").read_text())["eval"]["loss"]) < 0.05
    )  # bf16's rounding, not another model
    # The bounds exclude what a wrong engine would give: one step fewer moves the weights far more.
    assert max_param_diff(weights(runs / "ddp-7"), ddp) > 1e-3
    summary = json.loads((runs / "ddp" / "summary.json").read_text())
    assert summary["vocab_size"] == 512 and summary["eval"]["loss"] < 6.0  # below ln(512) = 6.24: it learned


def test_the_blocks_are_the_models_own_layers_found_from_it():
    for overrides, layer in ((LLAMA, "LlamaDecoderLayer"), (GPT2, "GPT2Block")):
        cfg = load_config(RECIPE, [overrides, "data.tokens=unused"])
        task = get_task(cfg.task)(cfg)
        task.vocab_size = 100
        model = task.build_model()
        blocks = task.blocks(model)
        assert [type(b).__name__ for b in blocks] == [layer, layer]
        assert (
            task.blocks(torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3))) != []
        )  # none named: the longest list


@pytest.mark.slow
def test_the_trained_model_leaves_as_a_save_pretrained_folder_that_from_pretrained_loads_unchanged(runs):
    folder = runs / "gpt2" / "hf"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))  # no pickles
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = torch.tensor([tokenizer("def decode(self, s):")["input_ids"]])
    cfg = load_config(str(runs / "gpt2" / "config.yaml"), [])
    task = get_task(cfg.task)(cfg)
    task.load_preprocessing(safeload.load_weights(runs / "gpt2" / safeload.PREPROCESSING))
    ours = task.inference_model()
    ours.load_state_dict(weights(runs / "gpt2"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours.eval()(ids).logits)
        assert not torch.equal(
            model(ids).logits, transformers.AutoModelForCausalLM.from_config(model.config)(ids).logits
        )
    # The documented line, in a plain interpreter of this environment (nothing of dtrain's imported
    # first): transformers' model classes import there (set-up leaves no torchvision that cannot).
    import subprocess

    line = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(folder)!r})"
    plain = subprocess.run([sys.executable, "-c", line], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]


@pytest.mark.slow
def test_a_saved_model_fine_tunes_as_a_classifier_from_its_folder(runs):
    summary = json.loads((runs / "classifier" / "summary.json").read_text())
    assert summary["eval"]["accuracy"] >= 0.9  # two vocabularies, one per label: learnable in 30 steps
    pretrained, tuned = weights(runs / "gpt2"), weights(runs / "classifier")
    body = "transformer.h.0.attn.c_attn.weight"  # started from the folder: still near it after a short fine-tune
    assert (tuned[body] - pretrained[body]).abs().max() < (pretrained[body]).abs().max()
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(str(runs / "classifier" / "hf"))
    assert classifier.config.num_labels == 2


@pytest.mark.slow
def test_a_finished_run_predicts_without_the_folder_it_was_fine_tuned_from(runs, tmp_path):
    """The run folder is enough: a classifier fine-tuned from `model.pretrained` is built from its
    own saved config, not that folder's (here moved away; it was read again, and refused)."""
    import shutil

    import dtrain

    moved = tmp_path / "classifier"
    shutil.copytree(runs / "classifier", moved, ignore=shutil.ignore_patterns("checkpoints"))
    text = (moved / "config.yaml").read_text()
    pretrained = yaml.safe_load(text)["model"]["pretrained"]
    (moved / "config.yaml").write_text(text.replace(pretrained, str(tmp_path / "moved-away")))
    predictor = dtrain.load(moved)
    probabilities = predictor(torch.randint(0, predictor.task.vocab_size, (3, 16)))
    assert probabilities.shape == (3, 2) and torch.allclose(probabilities.sum(-1), torch.ones(3))
    # Raw text, tokenised by the tokenizer the run saved in hf/: one vocabulary per label.
    texts = ["alpha beta gamma alpha beta", "delta omega sigma delta omega"]
    assert predictor(texts).argmax(-1).tolist() == [0, 1] and predictor(texts[0]).shape == (1, 2)
    np.save(tmp_path / "texts.npy", np.array(texts))  # `dtrain predict` takes an array of strings alike
    predict_file(moved, tmp_path / "texts.npy", tmp_path / "classes.npy", batch_size=1)
    assert np.load(tmp_path / "classes.npy").argmax(-1).tolist() == [0, 1]
    # A causal LM: the next token's probabilities after the text.
    following = dtrain.load(runs / "gpt2")("def decode(self, s):")
    assert following.shape == (1, predictor_vocab(runs / "gpt2")) and torch.allclose(following.sum(-1), torch.ones(1))


def predictor_vocab(run: Path) -> int:
    return int(json.loads((run / "hf" / "config.json").read_text())["vocab_size"])


# ------------------------------------------------------------------ bad input, one line


def test_an_architecture_or_a_folder_is_needed_and_pickled_weights_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(RECIPE, ["model.config={}", "data.tokens=x"])
    with pytest.raises(ConfigError, match="model.config.model_type"):
        load_config(RECIPE, [f"model.pretrained={tmp_path}", "data.tokens=x"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 1}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"a pickle would run code")
    cfg = load_config(RECIPE, [f"model.pretrained={tmp_path}", "model.config={}", "data.tokens=x"])
    with pytest.raises(ConfigError, match=r"no \*\.safetensors weights \(pickled"):
        get_task(cfg.task)(cfg).build_model()
    custom = tmp_path / "custom"  # a folder whose config names modeling code of its own: never run
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {"AutoConfig": "mine.Config"}}))
    (custom / "mine.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    cfg = load_config(RECIPE, [f"model.pretrained={custom}", "model.config={}", "data.tokens=x"])
    with pytest.raises(ConfigError, match="contains custom code"):
        get_task(cfg.task)(cfg).build_model()
    assert not (tmp_path / "ran").exists()
    saved = tmp_path / "saved"  # a real folder whose weights were cut short in transfer
    transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=16)
    ).save_pretrained(str(saved))
    weights_file = saved / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:200])
    cfg = load_config(RECIPE, [f"model.pretrained={saved}", "model.config={}", "data.tokens=x"])
    with pytest.raises(ConfigError, match="its weights cannot be loaded"):
        get_task(cfg.task)(cfg).build_model()
    cfg = load_config(RECIPE, ["model.config={model_type: no_such_model}", "data.tokens=x"])
    with pytest.raises(ConfigError, match="model.config.model_type='no_such_model': is not an architecture"):
        get_task(cfg.task)(cfg).build_model()


def test_a_text_column_without_a_tokenizer_is_refused_naming_both(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": f"line {i}"} for i in range(20)]), tmp_path / "t.parquet")
    proc = run_dtrain(
        [
            "train",
            RECIPE,
            GPT2,
            f"data.path={tmp_path}/t.parquet",
            "data.tokens=",
            "tracking.enabled=false",
            f"output_dir={tmp_path}/out",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.tokenizer" in proc.stderr and "'text'" in proc.stderr


def test_prepare_text_with_a_tokenizer_writes_its_ids_and_names_it(tmp_path):
    source = Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py"
    make_tokenizer(tmp_path / "tok", [str(source)])
    meta = tokens.prepare([source], tmp_path / "ids", tokenizer=str(tmp_path / "tok"), show_progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    data = tokens.load(tmp_path / "ids", 16, 4)
    assert meta["vocab_size"] == data.vocab_size == 512 and data.chars is None
    text = source.read_text()
    first = data.train[0][0].tolist()
    assert tokenizer.decode(first) == text[: len(tokenizer.decode(first))]  # the ids are the tokenizer's, in order
