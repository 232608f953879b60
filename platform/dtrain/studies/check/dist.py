"""`distributed` (collective: every rank runs it): the ranks see different samples in a step,
build the same initial model and hold it after the engines wrap it, and the engine's reduced
gradient equals the mean of the gradients each rank computes alone."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from dtrain.engines import build_engines
from dtrain.protocols import Engine
from dtrain.runtime import distributed
from dtrain.studies.check.context import Context, Result, skip
from dtrain.studies.check.data import digest, sample_input
from dtrain.tasks import Task as SupervisedTask

GRAD_RTOL = 1e-5


def check_distributed(ctx: Context) -> list[Result]:
    world = distributed.world_size()
    if world == 1:
        return skip("distributed", "1 process: run under torchrun, or dtrain check --nproc-per-node 2")
    specs = _seeded_specs(ctx)
    built = _params_digest({k: s.module.state_dict() for k, s in specs.items()})
    engines = build_engines(ctx.cfg, specs, ctx.device, ctx.plan, total_steps=1)
    wrapped = _params_digest({k: e.consolidated_state_dict() for k, e in engines.items()})
    return [same_samples(ctx, world), same_params(built, wrapped, world), mean_gradients(ctx, engines)]


def _seeded_specs(ctx: Context) -> dict[str, Any]:
    torch.manual_seed(ctx.cfg.seed)
    return ctx.task.models()


def _params_digest(state: dict[str, dict[str, torch.Tensor]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for model in sorted(state):
        for key, v in sorted(state[model].items()):
            h.update(key.encode() + v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def same_samples(ctx: Context, world: int) -> Result:
    """The inputs of this rank's first step, compared by content with every other rank's."""
    mine = set()
    for batch in ctx.batches(ctx.plan.accum):
        inputs = sample_input(batch)
        mine |= {digest(x.cpu()) for x in inputs}
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    shared = len(set.intersection(*every))
    overlap = sum(len(a & b) for i, a in enumerate(every) for b in every[i + 1 :])
    detail = f"{world} ranks x {len(mine)} distinct inputs in the first step; {overlap} shared between ranks"
    want = "no input on two ranks"
    if shared == len(mine):
        return Result(
            "distributed/samples",
            "FAIL",
            overlap,
            want,
            detail + ": every rank trains on the same samples (the data is not sharded across ranks)",
        )
    if overlap:
        return Result(
            "distributed/samples",
            "WARN",
            overlap,
            want,
            detail + " (equal inputs at different indices: duplicated samples in the data?)",
        )
    return Result("distributed/samples", "PASS", overlap, want, detail)


def same_params(built: str, wrapped: str, world: int) -> Result:
    every_built: list[Any] = [None] * world
    every_wrapped: list[Any] = [None] * world
    dist.all_gather_object(every_built, built)
    dist.all_gather_object(every_wrapped, wrapped)
    differ = len(set(every_built)) - 1
    want = "identical on every rank"
    if len(set(every_wrapped)) > 1:
        return Result(
            "distributed/params",
            "FAIL",
            len(set(every_wrapped)) - 1,
            want,
            "ranks hold different parameters after the engines wrapped the models",
        )
    if differ:
        return Result(
            "distributed/params",
            "WARN",
            differ,
            want,
            "the task builds different initial weights "
            "per rank (initialisation not seeded alike); the engine broadcast rank 0's, so training "
            "is consistent, but anything computed before wrapping is not",
        )
    return Result("distributed/params", "PASS", 0, want, "same digest on every rank, built and wrapped")


def mean_gradients(ctx: Context, engines: dict[str, Engine]) -> Result:
    """In eval mode (no dropout masks or batch statistics that differ between the two passes),
    with the same random stream for both (augmentation): one step's micro-batches through a
    plain copy, the local gradients averaged over ranks by an all-reduce, against the gradient
    the engine's backward leaves (DDP's buckets, DeepSpeed's reduce)."""
    task = ctx.task
    if not isinstance(task, SupervisedTask) or "model" not in engines:
        return Result("distributed/grads", "SKIP", None, "-", f"the {ctx.cfg.task} task steps its own models")
    engine = engines["model"]
    batches = ctx.batches(ctx.plan.accum)
    local = ctx.fresh_model()
    local.load_state_dict(engine.consolidated_state_dict())
    local.eval()
    torch.manual_seed(1000 + distributed.rank())
    for batch in batches:
        (task.loss(local, batch) / len(batches)).backward()
    mean = torch.cat(
        [
            p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
            for p in local.parameters()
        ]
    )
    dist.all_reduce(mean)
    mean /= distributed.world_size()

    engine.model.eval()
    torch.manual_seed(1000 + distributed.rank())
    for i, batch in enumerate(batches):
        with engine.no_sync(skip=i < len(batches) - 1):
            engine.backward(task.loss(engine.model, batch), len(batches))
    reduced = _engine_grads(engine)
    err = float((reduced - mean).abs().max() / mean.abs().max().clamp(min=1e-30))
    detail = (
        f"{ctx.cfg.engine} engine, {len(batches)} micro-batch(es) per rank, {mean.numel()} gradient "
        f"elements; max |engine - mean of local| / max |mean| = {err:.2g}"
    )
    want = f"relative difference < {GRAD_RTOL:g}"
    if err < GRAD_RTOL:
        return Result("distributed/grads", "PASS", err, want, detail)
    return Result(
        "distributed/grads",
        "FAIL",
        err,
        want,
        detail + ": the engine's gradient is not the mean over "
        "ranks (a parameter outside the wrapped model, or gradients reduced twice / not at all)",
    )


def _engine_grads(engine: Engine) -> torch.Tensor:
    """The full reduced gradient the engine holds after backward, in parameter order."""
    grads, params = engine.full_grads(), engine.full_params()  # whole tensors, gathered when sharded
    return torch.cat(
        [
            grads[n].flatten().float().to(engine.device)
            if n in grads
            else torch.zeros(params[n].numel(), device=engine.device)
            for n, _ in engine.module.named_parameters()
        ]
    )
