"""The causes `invariance` names: what differs first in a step (`Finding`), and the likely
cause with its fix (`diagnose`), in the order a step computes. Each cause is shown on a user
task with it planted (tests/planted.py, tests/test_invariance_check.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Finding:
    """One part of one step that differs: what, where, by how much."""

    part: str
    value: float
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def diagnose(found: dict[str, Finding], noise: Finding | None) -> tuple[str, str]:
    """(the likely cause, its fix) from the first thing that differs (`found`: the parts that
    differ) in a step's order; first of all, two 1-rank runs that differ (`noise`)."""
    if noise is not None:
        return (
            f"two identical 1-process runs already differ at {noise.where} ({noise.value:.2g}): a "
            "non-deterministic op, whose differences grow over a long run",
            "find it with torch.use_deterministic_algorithms(True) (it raises at such ops), "
            "then use a deterministic form (e.g. index_add_/scatter_add_ instead of index_put_(accumulate=True))",
        )
    if (f := found.get("samples")) is not None:
        return _samples_cause(f)
    if (f := found.get("lr")) is not None:
        return (
            f"the LR differs at the same step ({f.where}: {f.extra['ref']:.6g} at 1 rank, "
            f"{', '.join(f'{x:.6g}' for x in f.extra['ranks'])} at N)",
            "state the LR for the global batch (optim.scale_rule with optim.base_batch_size scales by the global "
            "batch, never by the world size)",
        )
    if (f := found.get("forward")) is not None:
        return _forward_cause(f)
    if (f := found.get("loss")) is not None:
        return (
            f"every module's output agrees but the loss ({f.where}) does not: a mean per rank over unequal counts "
            "(padding, ignore_index, masks) is not the mean over the global batch",
            "reduce by sums: the sum of per-token losses over the global count of valid tokens (all-reduce the "
            "count; times the world size, as DDP averages gradients), as eval_sums does for evaluation",
        )
    if (f := found.get("grads")) is not None:
        return (
            f"the forward and the loss agree but the gradient of {f.where} does not: the engine's gradient is not "
            "the mean over ranks (a parameter outside the wrapped model, gradients scaled per rank, or a loss "
            "averaged per rank over unequal counts whose mean happens to agree)",
            "keep every trained parameter inside the model the task returns; scale the loss, not the gradients; "
            "reduce a masked loss by sums",
        )
    if (f := found.get("params")) is not None:
        return (
            f"the gradients agree but {f.where} after the step does not: the update uses rank-local values "
            "(a norm, a trust ratio or a clip over the local gradient)",
            "clip and scale with the reduced gradients (dtrain's engines do; check a custom optimizer)",
        )
    f = found["buffers"]
    return (
        f"buffer {f.where} differs on rank {f.extra['rank']} after the step: it is updated from rank-local values, "
        "or on some ranks only",
        "update it on every rank from all-reduced values, or broadcast it from rank 0",
    )


def _samples_cause(f: Finding) -> tuple[str, str]:
    if f.extra["shared"]:
        return (
            f"{f.extra['shared']} sample(s) trained on two ranks in one step, {f.extra['missing']} of the "
            "1-rank batch on none: the data is not split across ranks (a dataset that reads in its own order "
            "and ignores the index the sampler gives, or a sampler without the distributed split)",
            "let dtrain's sampler split the data: __getitem__ returns the sample of the index it is given",
        )
    if not f.extra["same_indices"]:
        return (
            f"{f.extra['missing']} sample(s) of the 1-rank batch are on no rank: the ranks' samplers do not "
            "split one order (a per-rank seed or dataset length, or drop_last cutting differently)",
            "build the same dataset on every rank and seed the order alike (seed, not seed + rank)",
        )
    if not f.extra["stable"]:
        return (
            f"the same indices give different samples ({f.extra['missing']} differ): the data pipeline "
            "draws from the global or per-worker random stream (augmentation, noise), seeded per rank",
            "draw per sample from the generator dtrain passes to the task's augmentation "
            "(data.sample_generator(seed, epoch, index)), or wrap library transforms in data.seeded(generator)",
        )
    if f.extra.get("rounding") is not None:
        return (
            f"the same indices give samples that differ by rounding only ({f.extra['missing']} of them, at most "
            f"{f.extra['rounding']:.1e} relative): the data is computed another way on the ranks (a float "
            "reduction over another thread count or batch, e.g. normalising with x.mean()), not other data",
            "compute it the same way everywhere: once for the whole dataset, in float64, or before training",
        )
    return (
        f"the same indices give different samples ({f.extra['missing']} differ) though each reads back alike: "
        "the dataset differs between ranks (built or sharded per rank)",
        "build the whole dataset on every rank and let dtrain's sampler split it (no rank-dependent sharding)",
    )


def _forward_cause(f: Finding) -> tuple[str, str]:
    if f.extra["inputs"]:
        return (
            f"the inputs of {f.where}'s forward {f.extra['call']} differ though the samples agree: they are made "
            "inside the step, per rank (noise or masks drawn from the rank's stream)",
            "draw them for the global batch and keep this rank's slice, or per sample from "
            "data.sample_generator(seed, epoch, index)",
        )
    if f.extra["kind"] == "bn":
        return (
            f"BatchNorm statistics per rank: {f.where} normalises with its rank's part of the batch",
            "model.sync_bn=true (dtrain's synchronised BatchNorm: statistics over the global batch)",
        )
    if f.extra["drew"]:
        return (
            f"a per-rank random stream: {f.where} draws from the global RNG (dropout, noise), seeded per rank, "
            "so a sample's draw depends on the rank that computes it",
            "draw per sample (a generator from data.sample_generator(seed, epoch, index)) or for the global batch "
            "and slice, or set its probability to 0 for the comparison",
        )
    return (
        f"{f.where}'s output for a sample depends on the other samples of its rank's part of the batch "
        "(a statistic or an op across the batch dimension)",
        "compute it over the global batch (all-reduce it, as synchronised BatchNorm does) or per sample",
    )
