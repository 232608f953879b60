"""What one rank computes in the first steps of training, recorded for the `invariance` check.

The recipe is built as `fit` builds it (`trainer.build`: same initial weights, the sharded
loader, the engines) and stepped through the task's own `train_step`, so what is recorded is
what training does; only fp32, no compile and no loader workers are imposed (see `for_tracing`).
Per step, on this rank:

- `indices`, `digests`, `sums`: each sample's dataset index (from the sampler), content hash and
  float64 sums (of its values, of their magnitudes);
- `loss`, `metrics`, `lr`: the step's loss (this rank's), its other metrics, each model's LR;
- `calls` (the first step): every forward of a model (its root module): the input, and each
  submodule's output in completion order (children before their parent), with the modules that
  drew from the global random stream while running (`drew`);
- `grads` (rank 0): each gradient as the optimizer sees it (reduced, before clipping), per
  optimizer step of each model; `params` (rank 0): each parameter after the step;
- `buffers`: this rank's buffers after the step (every rank: they may differ between ranks).

After the steps, every sample is read again twice (`stable`): a sample whose content changes
between reads draws from a stream that is not its own. The record is plain tensors, lists and
numbers (`torch.load(weights_only=True)` reads it back).
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from dtrain import data
from dtrain.config import Config
from dtrain.engines.norm import DistributedBatchNorm
from dtrain.protocols import Engine
from dtrain.runtime import distributed
from dtrain.runtime.files import atomic_write
from dtrain.train.fit import build

Record = dict[str, Any]


def for_tracing(cfg: Config) -> Config:
    """What the trace changes in a recipe: fp32 (mixed precision's rounding would hide the
    differences looked for), no compile (hooks see every module), no loader workers (the
    per-sample streams make the worker count irrelevant; a dataset drawing from the global
    stream draws per rank either way)."""
    cfg.precision, cfg.compile, cfg.data.num_workers = "fp32", False, 0
    return cfg


def module_kind(module: nn.Module) -> str:
    """What the diagnosis needs to know of a module: BatchNorm that normalises per rank, or not."""
    if isinstance(module, (nn.SyncBatchNorm, DistributedBatchNorm)):
        return "syncbn"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        return "bn"
    return ""


def sample_digests(batch: Any) -> list[str]:
    """A content hash per sample of a collated batch (every tensor of the batch whose first
    dimension is the batch's)."""
    n = data.batch_len(batch)
    parts = [t for t in _tensors(batch) if t.dim() > 0 and len(t) == n]
    out = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=8)
        for t in parts:
            h.update(t[i].detach().cpu().contiguous().numpy().tobytes())
        out.append(h.hexdigest())
    return out


def sample_sums(batch: Any) -> list[tuple[float, float]]:
    """Per sample of a collated batch: the float64 sum of its floating-point values and of their
    magnitudes. Two samples whose digests differ but whose sums agree to rounding differ by
    rounding: the data computed another way (another thread count, another batch), not other data."""
    n = data.batch_len(batch)
    parts = [t for t in _tensors(batch) if t.dim() > 0 and len(t) == n and t.is_floating_point()]
    return [
        (
            sum(float(t[i].detach().double().sum()) for t in parts),
            sum(float(t[i].detach().double().abs().sum()) for t in parts),
        )
        for i in range(n)
    ]


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _first_tensor(x: Any) -> torch.Tensor | None:
    return next((t for t in _tensors(x) if t.dim() > 0), None)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    full = t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (FSDP2): the whole of it
    return full.detach().float().cpu().clone()


class Recorder:
    """Forward hooks on every module of every engine's model, and the engines' gradient hook."""

    def __init__(self, engines: dict[str, Engine], device: torch.device):
        self.engines, self.device = engines, device
        self.active = False
        """Record forwards (the first step)."""
        self.grads_on = False
        """Record gradients (every step)."""
        self.calls: list[Record] = []
        self.grads: dict[str, dict[str, torch.Tensor]] = {}
        self.kinds: dict[str, str] = {}
        self._depth = 0
        self._rng: list[torch.Tensor] = []
        for name, engine in engines.items():
            root = engine.module
            root.register_forward_pre_hook(partial(self._enter, name), with_kwargs=True)
            root.register_forward_hook(partial(self._leave, name))
            for sub_name, sub in root.named_modules():
                if sub is not root:
                    self.kinds[f"{name}.{sub_name}"] = module_kind(sub)
                    sub.register_forward_pre_hook(self._push)
                    sub.register_forward_hook(partial(self._output, f"{name}.{sub_name}"))
            engine.on_gradients = partial(self._gradients, name, engine)

    # Only forwards inside a model's own call count: activation checkpointing runs blocks
    # again during backward, outside any root call, and those are not new work.
    def _enter(self, model: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self.active and self._depth == 0:
            x = _first_tensor((args, kwargs))
            self.calls.append(
                {"model": model, "input": _cpu(x) if x is not None else torch.zeros(0), "outputs": [], "drew": []}
            )
        self._depth += 1

    def _leave(self, model: str, module: nn.Module, args: Any, out: Any) -> None:
        self._depth -= 1

    def _rng_state(self) -> torch.Tensor:
        state = torch.random.get_rng_state()
        if self.device.type == "cuda":
            state = torch.cat([state, torch.cuda.get_rng_state(self.device)])
        return state

    def _push(self, module: nn.Module, args: Any) -> None:
        if self.active and self._depth > 0:
            self._rng.append(self._rng_state())

    def _output(self, name: str, module: nn.Module, args: Any, out: Any) -> None:
        if not (self.active and self._depth > 0):
            return
        call = self.calls[-1]
        if not torch.equal(self._rng.pop(), self._rng_state()):
            call["drew"].append(name)
        t = _first_tensor(out)
        if t is not None and t.is_floating_point():
            call["outputs"].append([name, _cpu(t)])

    def _gradients(self, model: str, engine: Engine) -> None:
        grads = engine.full_grads()  # a collective under sharding: every rank calls it
        if self.grads_on and distributed.is_main():
            k = sum(key.startswith(f"{model}#") for key in self.grads)
            self.grads[f"{model}#{k}"] = {n: _cpu(g) for n, g in grads.items()}


def record(cfg: Config, device: torch.device, steps: int) -> Record:
    """Build the recipe as training does and record its first `steps` steps on this rank."""
    parts = build(cfg, device)
    recorder = Recorder(parts.engines, device)
    sampled = list(_steps(parts.loader, parts.micro, parts.per_epoch, steps))
    out: list[Record] = []
    for step, (keys, batches) in enumerate(sampled):
        # Forwards on the first step only: there a difference is where it starts; later, a
        # module's output also carries what earlier steps' roundings grew into.
        recorder.active, recorder.calls, recorder.grads = step == 0, [], {}
        recorder.grads_on = True
        result = parts.task.train_step(parts.engines, [data.move(b, device) for b in batches])
        recorder.active = recorder.grads_on = False
        full = {m: e.full_params() for m, e in parts.engines.items()}  # a collective under sharding: every rank
        params = {m: {n: _cpu(p) for n, p in ps.items()} for m, ps in full.items()} if distributed.is_main() else {}
        out.append(
            {
                "indices": [_index(k) for k in keys],
                "digests": [d for b in batches for d in sample_digests(b)],
                "sums": [v for b in batches for v in sample_sums(b)],
                "loss": float(result.loss),
                "metrics": {k: float(v) for k, v in result.metrics.items()},
                "lr": {m: float(e.lr) for m, e in parts.engines.items()},
                "calls": recorder.calls,
                "grads": recorder.grads,
                "params": params,
                "buffers": {m: {n: _cpu(b) for n, b in e.module.named_buffers()} for m, e in parts.engines.items()},
            }
        )
    for done, (keys, _) in zip(out, sampled):
        done["stable"] = [_rereads_alike(parts.loader, k) for k in keys]
    return {
        "world": distributed.world_size(),
        "rank": distributed.rank(),
        "engine": cfg.engine,
        "kinds": recorder.kinds,
        "steps": out,
        "parameters": parts.parameters,
    }


def _steps(loader: DataLoader[Any], micro: int, per_epoch: int, steps: int) -> Iterator[tuple[list[Any], list[Any]]]:
    """The first `steps` steps as (the samples' sampler keys, the loader batches), epoch after
    epoch as the loop runs them. Keys are None where the data is a stream (no sampler)."""
    epoch, done = 0, 0
    while done < steps:
        data.set_position(loader, epoch, 0)
        batches = data.start(loader)
        keys: Iterator[Any] = (k for b in loader.batch_sampler for k in b) if loader.batch_sampler else iter(())
        for _ in range(min(per_epoch, steps - done)):
            step_batches = [next(batches) for _ in range(micro)]
            n = sum(data.batch_len(b) for b in step_batches)
            yield [next(keys, None) for _ in range(n)], step_batches
            done += 1
        epoch += 1


def _index(key: Any) -> int:
    """The dataset index of a sampler key (an index, or (epoch, index) with augmentation); -1: none."""
    if key is None:
        return -1
    return int(key[1]) if isinstance(key, (tuple, list)) else int(key)


def _rereads_alike(loader: DataLoader[Any], key: Any) -> bool:
    """The sample at `key`, read twice more, is the same both times (its randomness, if any,
    comes from its own stream). True where there is no key to read by."""
    if key is None:
        return True
    reads = [sample_digests(default_collate([loader.dataset[key]]))[0] for _ in range(2)]
    return reads[0] == reads[1]


def trace_rank(cfg: Config, device: torch.device, folder: str) -> int:
    """`dtrain check --only invariance` on one of N ranks (started by the check itself): this
    rank's record to `folder/rank<r>.pt`."""
    trace = record(for_tracing(cfg), device, cfg.check.steps)
    path = Path(folder) / f"rank{distributed.rank()}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(trace, tmp))
    distributed.barrier()
    return 0
