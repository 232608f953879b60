"""What is done to a model block by block before an engine wraps it: activation checkpointing
and `torch.compile` (torchtitan's `parallelize` order: AC, then compile, then FSDP units).

A task names its blocks in `ModelSpec.blocks` (the Transformer's layers, the CNN's residual
blocks): the units that are recomputed in backward, compiled, and sharded by FSDP2. Both
changes are made in place, so parameter names, state_dicts and `model.pt` are the same as
without them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dtrain.errors import ConfigError

# Selective AC keeps what is expensive to recompute (matmuls, attention) and recomputes the
# cheap, memory-heavy rest (norms, activations, dropout masks are replayed from the RNG state):
# most of the memory saving of full AC for a fraction of its extra compute (torchtitan's "op" SAC).
_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.convolution.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> Any:
    return create_selective_checkpoint_contexts(_selective_policy)


def checkpoint_activations(block: nn.Module, mode: str) -> None:
    """Recompute `block`'s activations in backward instead of keeping them (`full`), or keep
    only its matmul and attention outputs (`selective`). The forward is replaced on the
    instance, so hooks (FSDP's all-gather) and parameter names stay as they are."""
    forward = block.forward
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context
    block.forward = functools.partial(checkpoint, forward, **kwargs)


def prepare(
    module: nn.Module, blocks: list[nn.Module], activation_checkpointing: str, compile: bool, what: str = "model"
) -> None:
    """Apply the recipe's `model.activation_checkpointing` and `compile` to `module`, in place."""
    if activation_checkpointing != "none":
        if not blocks:
            raise ConfigError(
                "model.activation_checkpointing",
                activation_checkpointing,
                f"needs blocks to checkpoint, and the task names none for its {what} (ModelSpec.blocks); use none",
            )
        for block in blocks:
            checkpoint_activations(block, activation_checkpointing)
    if compile:
        # Per block: FSDP2 all-gathers and DDP all-reduces between compiled blocks, overlapping
        # communication with compute; a model without named blocks is compiled whole.
        for unit in blocks or [module]:
            unit.compile()
