"""The DeepSpeed engine on 2 CPU ranks (DS_ACCELERATOR=cpu, gloo) against the DDP engine."""

import json

import pytest
from helpers import CNN, DDP_BASELINE, LM, TINY_CNN, load_params, max_param_diff, run_dtrain
from helpers import TINY_LM as TINY

from dtrain.data import BatchPlan
from dtrain.engines.deepspeed import ds_config
from dtrain.tasks.transformer import CharTransformer
from dtrain.train.config import load_config


@pytest.fixture
def lm(tiny_runs):
    return tiny_runs


@pytest.mark.slow
def test_zero_2_matches_ddp(lm):
    """ZeRO-1 is compared with DDP on the CNN below; every stage resumes exactly in the matrix."""
    ddp = load_params(lm("ddp", *DDP_BASELINE) / "model.pt")
    zero = lm("zero2", "engine=deepspeed", "deepspeed.zero_stage=2")
    assert max_param_diff(ddp, load_params(zero / "model.pt")) < 1e-4
    s = json.loads((zero / "summary.json").read_text())
    assert s["engine"] == "deepspeed" and s["lr"] == pytest.approx(2e-3 * (16 / 32) ** 0.5)  # sqrt rule, as DDP


@pytest.mark.slow
def test_zero_3_matches_ddp_and_saves_a_plain_model(lm):
    """(ZeRO-3 stopped and resumed equals the straight run: the combination matrix's cells.)"""
    straight = lm("zero3", "engine=deepspeed", "deepspeed.zero_stage=3")
    a = load_params(straight / "model.pt")
    assert max_param_diff(a, load_params(lm("ddp", *DDP_BASELINE) / "model.pt")) < 1e-4
    # model.pt is a consolidated plain state_dict: it loads into the plain model.
    cfg = load_config(straight / "config.yaml")
    vocab = json.loads((straight / "vocab.json").read_text())
    CharTransformer(cfg.model, len(vocab)).load_state_dict(a)


@pytest.mark.slow
def test_bf16_runs(lm):
    out = lm("zero2-bf16", "engine=deepspeed", "deepspeed.zero_stage=2", "precision=bf16")
    s = json.loads((out / "summary.json").read_text())
    fp32 = json.loads((lm("ddp", *DDP_BASELINE) / "summary.json").read_text())
    assert s["precision"] == "bf16" and s["final_loss"] < s["initial_loss"]
    # bf16 keeps 8 bits of mantissa: the same run ends where fp32 ends, not merely "lower".
    assert s["eval"]["loss"] == pytest.approx(fp32["eval"]["loss"], rel=0.02), (s["eval"], fp32["eval"])


@pytest.mark.slow
def test_cnn_recipe_on_both_engines(lm):
    ddp = lm("cnn-ddp", *DDP_BASELINE, recipe=CNN, base=TINY_CNN)
    zero = lm("cnn-zero1", "engine=deepspeed", "deepspeed.zero_stage=1", recipe=CNN, base=TINY_CNN)
    assert max_param_diff(load_params(ddp / "model.pt"), load_params(zero / "model.pt"), buffers=True) < 1e-4
    acc = [json.loads((d / "summary.json").read_text())["eval"]["accuracy"] for d in (ddp, zero)]
    assert acc[0] == acc[1]


def test_config_is_derived_from_the_recipe():
    cfg = load_config(
        LM,
        [
            "precision=bf16",
            "deepspeed.zero_stage=2",
            "optim.clip_grad_norm=0.7",
            "deepspeed.config={zero_optimization: {overlap_comm: true}, steps_per_print: 5}",
        ],
    )
    c = ds_config(cfg, BatchPlan(global_batch=64, per_rank=16, accum=2, world_size=2))
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (64, 16, 2)
    assert c["gradient_clipping"] == 0.7 and c["bf16"] == {"enabled": True} and "fp16" not in c
    assert c["zero_optimization"] == {"stage": 2, "overlap_comm": True} and c["steps_per_print"] == 5


def test_value_clipping_is_refused_with_deepspeed(tmp_path):
    proc = run_dtrain(["train", LM, *TINY, "engine=deepspeed", "optim.clip_grad_value=1.0"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "dtrain: error: optim.clip_grad_value=1.0: not supported with "
        "engine=deepspeed (DeepSpeed clips by norm: use optim.clip_grad_norm)"
    )
