"""The combination matrix: engines x precisions x features x events, generated pairwise.

Every pair of values of two factors appears in some cell (`allpairspy`), among the cells the
engines accept (`dtrain.engines.validate` is the filter); the pairs an engine refuses are
listed with their reason. Each cell is a tiny Transformer (1 block, dropout on) trained on 2
gloo ranks, in process groups shared by all cells: straight to step 4, and again stopped at
step 2 and resumed through the cell's event. The resumed run must end in the straight run's
state (every parameter, to float rounding), or be refused in one line.

    python tests/matrix.py            # prints the README's table (generated, never edited)
    pytest tests/test_matrix.py       # runs the cells
"""

from __future__ import annotations

import copy
import functools
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LM = str(ROOT / "recipes" / "transformer_charlm.yaml")
BASE = [
    "tracking.enabled=false",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=32",
    "data.global_batch_size=16",
    "data.max_chars=20000",
    "data.eval_blocks=16",
    "train.max_steps=4",
    "train.eval_every_steps=0",
    "checkpoint.every_steps=2",
    "optim.clip_grad_norm=1.0",
    "optim.lr=0.003",
    "optim.warmup_steps=2",
]
STOP_AT = 2

ENGINES = {
    "ddp": ["engine=ddp"],
    "zero0": ["engine=deepspeed", "deepspeed.zero_stage=0"],
    "zero1": ["engine=deepspeed", "deepspeed.zero_stage=1"],
    "zero2": ["engine=deepspeed", "deepspeed.zero_stage=2"],
    "zero3": ["engine=deepspeed", "deepspeed.zero_stage=3"],
    "fsdp": ["engine=fsdp"],
}
PRECISIONS = {p: [f"precision={p}"] for p in ("fp32", "bf16", "fp16")}
OPTIMIZERS = {
    "adamw": [],
    "schedulefree": ["optim.name=schedulefree_adamw", "optim.schedule=constant"],
    "lars": ["optim.name=lars", "optim.lr=0.3"],
    "lamb": ["optim.name=lamb"],
}
CORE = {  # each on or off in a cell: what the loop and the engines do themselves
    "async_checkpoint": ["checkpoint.async=true"],
    "accumulation": ["data.grad_accum_steps=2"],
    "activation_checkpointing": ["model.activation_checkpointing=full"],
    "init_from+freeze": ["model.init_from={init}", "model.freeze=[tok]"],
}


def _features() -> dict[str, list[str]]:
    """Every training feature is a factor by being one: its `matrix` overrides, from the registry
    ({init}: weights of the model at another seed; {run}: a finished run of the same task)."""
    from dtrain import features

    return {name: list(overrides) for f in features.registry() for name, overrides in f.matrix.items()}


FEATURES = {**CORE, **_features()}
ONE_RANK = "resumed on 1 rank, 2x accumulation"
EVENTS = {"stopped, resumed": [], ONE_RANK: [], "resumed with an override": ["data.num_workers=1"]}
"""How a cell's run continues after step 2. On 1 rank the global batch is kept by twice the
cell's accumulation (`Cell.resume_overrides`)."""
FACTORS = {
    "engine": list(ENGINES),
    "precision": list(PRECISIONS),
    "optimizer": list(OPTIMIZERS),
    "event": list(EVENTS),
    **{f: [False, True] for f in FEATURES},
}


@dataclass(frozen=True)
class Cell:
    number: int
    engine: str
    precision: str
    optimizer: str
    event: str
    features: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"cell{self.number:02d}"

    def overrides(self, init: str = "", run: str = "") -> list[str]:
        out = [*BASE, *ENGINES[self.engine], *PRECISIONS[self.precision], *OPTIMIZERS[self.optimizer]]
        for f in self.features:
            out += [o.format(init=init, run=run) for o in FEATURES[f]]
        return out

    def resume_overrides(self) -> list[str]:
        """The event's own overrides (1 rank: twice the accumulation, the same global batch)."""
        if self.event != ONE_RANK:
            return EVENTS[self.event]
        return [f"data.grad_accum_steps={4 if 'accumulation' in self.features else 2}"]

    def describe(self) -> str:
        return " ".join([self.engine, self.precision, self.optimizer, *self.features, f"| {self.event}"])


@functools.cache
def _base() -> tuple[dict, type]:
    from dtrain import features
    from dtrain.config import recipe
    from dtrain.config.schema import compose
    from dtrain.tasks import get_task

    raw = recipe.read_raw(LM, BASE)
    return raw, compose(get_task(str(raw["task"])).config_class, features.sections())


@functools.cache
def _refusal(values: frozenset[tuple[str, object]]) -> str:
    from dtrain.config import ConfigError, recipe
    from dtrain.train.config import validate

    v = dict(values)
    overrides = [
        *ENGINES[str(v.get("engine", "ddp"))],
        *PRECISIONS[str(v.get("precision", "fp32"))],
        *OPTIMIZERS[str(v.get("optimizer", "adamw"))],
        *[
            o.format(init=ROOT / "recipes", run=ROOT / "recipes")
            for f in FEATURES
            if v.get(f)
            for o in FEATURES[f]
            if not o.startswith("model.init_from")
        ],
    ]
    raw, config_class = _base()
    raw = copy.deepcopy(raw)
    try:
        for item in overrides:
            recipe.apply_override(raw, item)
        cfg = recipe.build(config_class, raw)
        validate(cfg)
    except ConfigError as e:
        return str(e)
    if v.get("event") == ONE_RANK and cfg.engine == "deepspeed":  # refused when it resumes
        return (
            "resume: the checkpoint was written by 2 DeepSpeed rank(s), this job has 1: ZeRO state is "
            "partitioned per rank, so resume on 2 rank(s)"
        )
    return ""


def refusal(values: dict[str, object]) -> str:
    """The one line dtrain refuses these factor values with ("" when it accepts them): the
    engines' `validate`, and the one refusal that can only come at resume."""
    return _refusal(frozenset(values.items()))


def _pairs(row: dict[str, object]) -> set[tuple[tuple[str, object], tuple[str, object]]]:
    items = sorted(row.items(), key=lambda kv: list(FACTORS).index(kv[0]))
    return set(itertools.combinations(items, 2))


def cells() -> list[Cell]:
    """Every pair of factor values that dtrain accepts, in at least one cell (a greedy covering
    array, AETG's way: each new cell starts from a pair not yet covered and takes, factor by
    factor, the accepted value that covers the most new pairs). Deterministic."""
    names = list(FACTORS)
    todo = _accepted_pairs()
    rows: list[dict[str, object]] = []
    while todo:
        (fa, va), (fb, vb) = min(todo, key=repr)
        row: dict[str, object] = {fa: va, fb: vb}
        for name in names:
            if name in row:
                continue
            options = [v for v in FACTORS[name] if not refusal({**row, name: v})]
            row[name] = max(options, key=lambda v: (len(_pairs({**row, name: v}) & todo), -FACTORS[name].index(v)))
        rows.append(row)
        todo -= _pairs(row)
    return [
        Cell(
            i,
            str(r["engine"]),
            str(r["precision"]),
            str(r["optimizer"]),
            str(r["event"]),
            tuple(f for f in FEATURES if r[f]),
        )
        for i, r in enumerate(rows)
    ]


def table() -> str:
    """Engines across, every other factor's values down: `yes` where a cell runs the pair,
    else the reason dtrain refuses it before launch."""
    covered = {(c.engine, v) for c in cells() for v in (c.precision, c.optimizer, c.event, *c.features)}
    rows = [*PRECISIONS, *OPTIMIZERS, *FEATURES, *EVENTS]
    lines = ["| | " + " | ".join(ENGINES) + " |", "|---" * (len(ENGINES) + 1) + "|"]
    reasons: dict[str, int] = {}
    for value in rows:
        cols = []
        for engine in ENGINES:
            if (engine, value) in covered:
                cols.append("yes")
                continue
            key = (
                "precision"
                if value in PRECISIONS
                else "optimizer"
                if value in OPTIMIZERS
                else "event"
                if value in EVENTS
                else value
            )
            # paths relative to the repository, so the table reads the same in every clone
            why = refusal({"engine": engine, key: True if value in FEATURES else value})
            why = why.replace(f"{ROOT}/", "")
            if why:
                reasons.setdefault(why, len(reasons) + 1)
                cols.append(f"refused ({reasons[why]})")
            else:
                cols.append("not covered")
        lines.append(f"| {value} | " + " | ".join(cols) + " |")
    lines += [""] + [f"({n}) `{why}`" for why, n in reasons.items()]
    return "\n".join(lines)


def _accepted_pairs() -> set[tuple[tuple[str, object], tuple[str, object]]]:
    names = list(FACTORS)
    return {
        pair
        for a, b in itertools.combinations(names, 2)
        for va in FACTORS[a]
        for vb in FACTORS[b]
        if not refusal({a: va, b: vb})
        for pair in _pairs({a: va, b: vb})
    }


def pairs_uncovered() -> list[tuple[tuple[str, object], tuple[str, object]]]:
    """Accepted pairs of values of any two factors that no cell runs (must stay empty)."""
    covered: set[tuple[tuple[str, object], tuple[str, object]]] = set()
    for c in cells():
        row = {
            "engine": c.engine,
            "precision": c.precision,
            "optimizer": c.optimizer,
            "event": c.event,
            **{f: f in c.features for f in FEATURES},
        }
        covered |= _pairs(row)
    return sorted(_accepted_pairs() - covered, key=repr)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "platform"))
    if "--cells" in sys.argv:
        for c in cells():
            print(c.name, c.describe())
    else:
        print(table())
