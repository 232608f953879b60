"""Pruning (`prune.*`, dtrain.features.prune): which weights are pruned, read off the layers
(a GPT-2's Conv1D, not its embedding or the head tied to it, not a frozen weight), and the
masks kept through a resume at `prune.start_step` or a `prune.amount` new to a resumed run."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import CNN, FakeRun

from dtrain.config import OptimConfig
from dtrain.engines.ddp import DDPEngine
from dtrain.engines.precision import AmpPrecision
from dtrain.features.prune import Prune, masks_for, prunable
from dtrain.protocols import StepOutput
from dtrain.train.config import load_config

STEPPED = StepOutput(torch.zeros(()), torch.zeros(()), True)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 6)
        self.body = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.tok.weight  # tied, as GPT-2's lm_head is to wte

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen(self.body(self.tok(x))))


def test_the_weights_of_linear_maps_are_chosen_and_embeddings_tied_or_frozen_ones_left_out():
    chosen, left = prunable(Tied())
    assert [name for name, _, _ in chosen] == ["body.weight"]
    assert left == {"tok.weight": "an embedding", "frozen.weight": "frozen"}


def test_a_gpt2s_conv1d_layers_are_pruned_by_their_outputs_and_its_embeddings_are_not():
    transformers = pytest.importorskip("dtrain.runtime.optional").transformers("test", "gpt2")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    chosen, left = prunable(model)
    names = {name: dim for name, _, dim in chosen}
    assert set(names) == {
        f"transformer.h.0.{n}.weight" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert set(names.values()) == {1}  # Conv1D computes x @ W: its outputs are W's columns
    assert left == {"transformer.wte.weight": "an embedding", "transformer.wpe.weight": "an embedding"}
    weights = [w for _, w, _ in chosen]
    masks = masks_for(weights, 0.5, "structured", list(names.values()))
    for mask in masks:  # whole output columns, half of them
        columns = mask.sum(0)
        assert set(columns.tolist()) <= {0.0, float(mask.shape[0])} and int((columns == 0).sum()) == mask.shape[1] // 2


def pruning(*overrides: str) -> tuple[Prune, FakeRun, DDPEngine]:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    e = DDPEngine(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)), OptimConfig(name="sgd", lr=0.1),
                  precision=AmpPrecision("fp32", cpu), device=cpu, global_batch=16, total_steps=10)  # fmt: skip
    run = FakeRun(load_config(CNN, ["tracking.enabled=false", "prune.amount=0.5", *overrides]), {"model": e})
    run.total_steps = 10
    return Prune(run), run, e


def step(feature: Prune, run: FakeRun, e: DDPEngine) -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(run.step))
    e.backward(e.model(x).pow(2).mean(), 1)
    e.step()
    run.step += 1
    feature.after_step(run, STEPPED)


def zeros(e: DDPEngine) -> int:
    return sum(int((m.weight == 0).sum()) for m in e.module if isinstance(m, nn.Linear))


def test_a_run_resumed_at_the_start_step_keeps_its_masks():
    """Stopped right after the round of step 2 (= prune.start_step) and resumed there: the masks
    come back from the zeros, because the pruning's state says a round ran (it was read back
    only past the start step: the optimizer then regrew every pruned weight)."""
    first, run, e = pruning("prune.start_step=2")
    first.setup(run)
    step(first, run, e), step(first, run, e)
    assert zeros(e) == 36  # half of 64 + 8
    state, weights = first.state_dict(), {k: v.clone() for k, v in e.module.state_dict().items()}
    resumed, run2, e2 = pruning("prune.start_step=2")
    e2.module.load_state_dict(weights)
    run2.step = 2
    resumed.load_state_dict(state)
    resumed.setup(run2)
    for _ in range(3):
        step(resumed, run2, e2)
    assert zeros(e2) == 36
    # The check can fail: without the state, the resumed run does not know it pruned.
    bare, run3, e3 = pruning("prune.start_step=2")
    e3.module.load_state_dict(weights)
    run3.step = 2
    bare.setup(run3)
    step(bare, run3, e3)
    assert zeros(e3) < 36


def test_prune_amount_new_to_a_resumed_run_prunes_when_it_resumes_and_says_so():
    feature, run, e = pruning("prune.start_step=2")
    run.step = 5  # resumed past the start step from a checkpoint that never pruned
    feature.setup(run)
    assert zeros(e) == 36
    assert any("pruned now to the schedule's 50%" in line for line in run.lines), run.lines
