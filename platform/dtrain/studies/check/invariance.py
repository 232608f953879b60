"""`invariance`: does the recipe train the same at world size 1 and at N, and if not, where and why?

The first `check.steps` steps are recorded (`dtrain.studies.check.trace`) twice in this process at
world size 1 (the global batch on one rank; the second run measures what the hardware's own
non-determinism leaves) and once on N ranks under torchrun (the global batch split), from the
same initial weights, in fp32. Step by step, in the order a step computes them, the records are
compared: the samples of the global batch, the LR, each forward's input and every module's
output (sample by sample: the N-rank rows are matched to the 1-rank rows by their input), the
loss, the gradients the optimizer sees, the parameters after the step and every rank's buffers.
The first step at which anything differs by more than float rounding explains
(`dtrain.studies.check.causes.diagnose`) the difference by the first thing that differs in that order, with its fix.

Two tensors differ when |a - b| / |b| (L2 norms) exceeds the tolerance: `check.tolerance`, or
by default `TOLERANCE_ULPS` fp32 rounding units times sqrt(log2 of the parameter count) (a sum
reassociated over a different split of the batch moves by a few rounding units, and a network
adds a few at each of its layers; a real cause moves by orders of magnitude more).
"""

from __future__ import annotations

import math
import subprocess  # nosec B404 # torchrun with this interpreter, no shell
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from dtrain.config import Config
from dtrain.runtime import launch
from dtrain.studies.check.causes import Finding, diagnose
from dtrain.studies.check.context import Result
from dtrain.studies.check.trace import Record, for_tracing, record

EPS32 = float(torch.finfo(torch.float32).eps)
TOLERANCE_ULPS = 256
SCALAR_SHARE = 1 / 64
FAIL_FACTOR = 10
"""A difference this many times the tolerance FAILs; between 1 and this, it WARNs."""
GRAD_AMPLIFICATION = 100
"""After the first step the runs' parameters already differ by the earlier steps' rounding, and
a step's gradients (its most sensitive part: a GAN's generator gradient passes through the
critic) may differ by up to this many times that difference. The first step starts from the
same weights, so there the tolerance alone holds: where a real cause shows (see `causes`)."""
PARTS = ("samples", "lr", "forward", "loss", "grads", "params", "buffers")


def tolerance(cfg: Config, parameters: int) -> float:
    if cfg.check.tolerance:
        return cfg.check.tolerance
    return TOLERANCE_ULPS * EPS32 * math.sqrt(math.log2(max(parameters, 2)))


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| (L2; inf when the shapes differ)."""
    return float((a.double() - b.double()).norm()) if a.shape == b.shape else math.inf


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in L2 norms (inf when the shapes differ; 0 for two zero tensors)."""
    return ratio(distance(a, b), float(b.double().norm()))


def ratio(diff: float, norm: float) -> float:
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


# ------------------------------------------------------------------ comparing one step


def compare_samples(ref: Record, ranks: list[Record]) -> Finding:
    """The union of the ranks' samples against the 1-rank global batch (as multisets); the
    value: samples of the 1-rank batch on no rank."""
    union = Counter(d for r in ranks for d in r["digests"])
    if union == Counter(ref["digests"]):
        return Finding("samples", 0.0)
    per_rank = [set(r["digests"]) for r in ranks]
    shared = sum(len(a & b) for i, a in enumerate(per_rank) for b in per_rank[i + 1 :])
    missing = sum((Counter(ref["digests"]) - union).values())
    idx_ref: Counter[int] = Counter(ref["indices"])
    idx_union: Counter[int] = Counter(i for r in ranks for i in r["indices"])
    stable = all(s for x in [ref, *ranks] for s in x["stable"])
    same_indices = idx_ref == idx_union and -1 not in idx_ref
    return Finding(
        "samples",
        float(missing),
        extra={
            "shared": shared,
            "missing": missing,
            "same_indices": same_indices,
            "stable": stable,
            "rounding": rounding_only(ref, ranks) if same_indices else None,
        },
    )


ROUNDING = 1e-5
"""Relative size below which samples that differ bit for bit differ by rounding only."""


def rounding_only(ref: Record, ranks: list[Record]) -> float | None:
    """The largest relative difference between the same index's sample on the ranks and in the
    1-rank batch, when every difference is of rounding size (None when one is larger, or the
    records carry no sums)."""
    if "sums" not in ref:
        return None
    by_index = dict(zip(ref["indices"], ref["sums"]))
    worst = 0.0
    for r in ranks:
        for index, (total, size) in zip(r["indices"], r.get("sums", [])):
            ref_total, ref_size = by_index.get(index, (total, size))
            worst = max(worst, abs(total - ref_total) / max(ref_size, size, 1e-30))
    return worst if worst < ROUNDING else None


def compare_lr(ref: Record, ranks: list[Record]) -> Finding:
    worst = max(
        ((abs(r["lr"][m] - v) / max(abs(v), 1e-30), m) for r in ranks for m, v in ref["lr"].items()), default=(0.0, "")
    )
    return Finding("lr", worst[0], worst[1], {"ref": ref["lr"][worst[1]], "ranks": [r["lr"][worst[1]] for r in ranks]})


def align(ref_input: torch.Tensor, inputs: list[torch.Tensor], tol: float) -> list[torch.Tensor] | None:
    """For each rank, the rows of the 1-rank input its rows are (nearest row; every row used
    once), or None when the rows do not correspond."""
    n = sum(len(x) for x in inputs)
    if ref_input.dim() == 0 or n != len(ref_input) or any(x.shape[1:] != ref_input.shape[1:] for x in inputs):
        return None
    ref = ref_input.flatten(1).double()
    maps = []
    for x in inputs:
        rows = x.flatten(1).double()
        dist = torch.cdist(rows, ref)
        nearest = dist.argmin(1)
        scale = ref[nearest].norm(dim=1).clamp(min=1e-30)
        if bool((dist.gather(1, nearest[:, None])[:, 0] / scale > tol).any()):
            return None
        maps.append(nearest)
    if len(set(torch.cat(maps).tolist())) != n:
        return None
    return maps


def compare_calls(ref: Record, ranks: list[Record], tol: float, kinds: dict[str, str]) -> Finding:
    """Forward by forward, module by module: the first output (in completion order) that
    differs, sample-aligned; or the first forward whose inputs do not correspond. Agreeing:
    the largest difference seen."""
    calls = [r["calls"] for r in ranks]
    worst = Finding("forward", 0.0)
    if any(len(c) != len(ref["calls"]) for c in calls):
        return worst  # a different number of forwards: nothing to align (the loss and gradients still say)
    for i, ref_call in enumerate(ref["calls"]):
        maps = align(ref_call["input"], [c[i]["input"] for c in calls], tol)
        if maps is None:
            return Finding("forward", math.inf, ref_call["model"], {"call": i, "inputs": True})
        rows = []
        for j, (name, ref_out) in enumerate(ref_call["outputs"]):
            if any(j >= len(c[i]["outputs"]) or c[i]["outputs"][j][0] != name for c in calls):
                break  # control flow differs from here on
            outs: list[torch.Tensor] = [c[i]["outputs"][j][1] for c in calls]
            if (
                ref_out.dim() == 0
                or len(ref_out) != len(ref_call["input"])
                or any(o.shape[:1] != m.shape for o, m in zip(outs, maps))
            ):
                continue  # not one row per sample: not comparable row by row
            value = rel(torch.cat(outs), torch.cat([ref_out[m] for m in maps]))
            drew = name in ref_call["drew"] or any(name in c[i]["drew"] for c in calls)
            rows.append((name, value, kinds.get(name, ""), drew))
        bad = [r for r in rows if r[1] > tol]
        if bad:
            return Finding(
                "forward",
                bad[0][1],
                bad[0][0],
                {
                    "call": i,
                    "model": ref_call["model"],
                    "kind": bad[0][2],
                    "drew": bad[0][3],
                    "modules": rows,
                    "inputs": False,
                },
            )
        worst = max([worst, *(Finding("forward", r[1], r[0]) for r in rows)], key=lambda f: f.value)
    return worst


def compare_tensors(
    part: str, ref: dict[str, dict[str, torch.Tensor]], other: dict[str, dict[str, torch.Tensor]], rank: int = 0
) -> Finding:
    """Per model, |a - b| / |b| over all its tensors at once (a tensor whose entries cancel to
    near zero, e.g. a bias before a normalisation, is judged against the model's scale, not
    its own), naming the tensor that differs most; the largest over the models."""
    worst = Finding(part, 0.0)
    for model, tensors in ref.items():
        theirs = other.get(model, {})
        diffs = {n: distance(theirs.get(n, torch.zeros(0)), t) for n, t in tensors.items()}
        norm = math.sqrt(sum(float(t.double().norm()) ** 2 for t in tensors.values()))
        value = ratio(math.sqrt(sum(d * d for d in diffs.values())), norm)
        if value > worst.value:
            name = max(diffs, key=lambda n: diffs[n])
            worst = Finding(part, value, f"{model.split('#')[0]}.{name}", {"model": model, "rank": rank})
    return worst


def compare_loss(ref: Record, ranks: list[Record]) -> Finding:
    """The loss the loop logs (the mean over ranks), and the task's other step metrics."""
    pairs = {"loss": (ref["loss"], sum(r["loss"] for r in ranks) / len(ranks))}
    pairs |= {
        k: (v, sum(r["metrics"].get(k, math.nan) for r in ranks) / len(ranks))
        for k, v in ref["metrics"].items()
        if "loss" in k
    }
    worst = max(((abs(b - a) / max(abs(a), 1e-30), k) for k, (a, b) in pairs.items()), default=(0.0, "loss"))
    return Finding("loss", worst[0], worst[1])


def compare_step(ref: Record, ranks: list[Record], tol: float, kinds: dict[str, str]) -> dict[str, Finding]:
    """Each part of one step, compared (`differs` says which parts differ)."""
    return {
        "samples": compare_samples(ref, ranks),
        "lr": compare_lr(ref, ranks),
        "forward": compare_calls(ref, ranks, tol, kinds),
        "loss": compare_loss(ref, ranks),
        "grads": compare_tensors("grads", ref["grads"], ranks[0]["grads"]),
        "params": compare_tensors("params", ref["params"], ranks[0]["params"]),
        "buffers": max(
            (compare_tensors("buffers", ref["buffers"], x["buffers"], r) for r, x in enumerate(ranks)),
            key=lambda f: f.value,
        ),
    }


def limit(f: Finding, tol: float) -> float:
    """What `f` may differ by: samples not at all; a scalar (the loss, the LR: a handful of
    roundings) by `SCALAR_SHARE` of the tolerance; tensors by the tolerance, gradients after the
    first step also by `GRAD_AMPLIFICATION` times the parameters' difference they start from."""
    if f.part == "samples":
        return 0.0
    return tol * SCALAR_SHARE if f.part in ("loss", "lr") else tol + f.extra.get("drift", 0.0) * GRAD_AMPLIFICATION


def differs(f: Finding, tol: float) -> bool:
    return f.value > limit(f, tol)


def nondeterminism(a: Record, b: Record) -> Finding | None:
    """Two 1-rank runs of the same step, bit for bit: where they first differ at all, an op is
    not deterministic (its differences start at rounding level and grow over a long run)."""
    for ca, cb in zip(a["calls"], b["calls"]):
        for (name, x), (_, y) in zip(ca["outputs"], cb["outputs"]):
            if (value := rel(y, x)) > 0:
                return Finding("determinism", value, name)
    for part in ("grads", "params"):
        if (f := compare_tensors(part, a[part], b[part])).value > 0:
            return Finding(
                "determinism",
                f.value,
                f"the backward pass ({f.where}'s {part})" if part == "grads" else f"the optimizer step ({f.where})",
            )
    return None


# ------------------------------------------------------------------ the check


def run(
    cfg: Config, device: torch.device, recipe: str, overrides: Sequence[str], nproc: int
) -> tuple[list[Result], dict[str, Any]]:
    """Record at world size 1 (twice) here and at `nproc` under torchrun; compare; explain."""
    folder = Path(cfg.output_dir) / "check" / "invariance"
    t0 = time.perf_counter()
    # The reference with the threads each rank gets: a reduction split over another number of
    # threads rounds differently, which would read as a difference between world sizes.
    threads = torch.get_num_threads()
    torch.set_num_threads(launch.rank_threads(nproc))
    try:
        ref = [record(for_tracing(cfg), device, cfg.check.steps) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    t1 = time.perf_counter()
    cmd = launch.torchrun_cmd(
        nproc, recipe, overrides, command=("check", "--only=invariance", f"--trace-to={folder / f'world{nproc}'}")
    )
    proc = subprocess.run(cmd, env=launch.torchrun_env(nproc=nproc), check=False)  # nosec B603 # this interpreter, no shell
    t2 = time.perf_counter()
    timing = f"1 rank x2 {t1 - t0:.1f}s + {nproc} ranks {t2 - t1:.1f}s (with process start)"
    if proc.returncode != 0:
        return [
            Result(
                "invariance",
                "FAIL",
                None,
                "both runs finish",
                f"the {nproc}-rank run failed (exit code {proc.returncode}, its error above); {timing}",
            )
        ], {}
    ranks = [torch.load(folder / f"world{nproc}" / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    return compare(cfg, ref, ranks, nproc, timing)


def compare(
    cfg: Config, ref: list[Record], ranks: list[Record], nproc: int, timing: str
) -> tuple[list[Result], dict[str, Any]]:
    """Step by step until the first that differs: the results, and the details for check.json
    (the tolerance, that step, the divergence curves and its module table)."""
    tol = tolerance(cfg, ref[0]["parameters"])
    first, noise, seen, bad = 0, Finding("determinism", 0.0), {p: Finding(p, 0.0) for p in PARTS}, {}
    drift = 0.0  # the parameters' difference after the previous step
    for t, (a, b) in enumerate(zip(ref[0]["steps"], ref[1]["steps"])):
        if not noise.value and (n := nondeterminism(a, b)):
            noise = Finding("determinism", n.value, f"{n.where} at step {t + 1}")
        found = compare_step(a, [r["steps"][t] for r in ranks], tol, ref[0]["kinds"])
        found["grads"].extra["drift"] = drift
        drift = found["params"].value
        seen = {p: max(seen[p], found[p], key=lambda f: f.value) for p in PARTS}
        bad = {p: f for p, f in found.items() if differs(f, tol)}
        if bad or noise.value > tol:
            first = t + 1
            break
    curves = divergence(ref[0], ranks[0])
    why = (
        "check.tolerance"
        if cfg.check.tolerance
        else f"{TOLERANCE_ULPS} x fp32 eps x sqrt(log2 of {ref[0]['parameters']:,} parameters)"
    )
    setting = (
        f"{len(ref[0]['steps'])} step(s), 1 rank x {cfg.data.global_batch_size} vs {nproc} ranks x "
        f"{cfg.data.global_batch_size // nproc}, {cfg.engine}, fp32; tolerance {tol:.2g} ({why}); {timing}"
    )
    results = [_headline(first, bad, noise, tol, seen, setting)]
    results += [_part(f, first, tol) for f in (*seen.values(), noise)]
    modules = bad["forward"].extra.get("modules", []) if "forward" in bad else []
    details = {
        "tolerance": tol,
        "first_step": first,
        "curves": {k: list(map(_json, v)) for k, v in curves.items()},
        "modules": [{"module": n, "rel": _json(v), "kind": k, "drew": d} for n, v, k, d in modules],
    }
    return results, details


def _headline(
    first: int, bad: dict[str, Finding], noise: Finding, tol: float, seen: dict[str, Finding], setting: str
) -> Result:
    """PASS; WARN when the runs agree but an op is not deterministic; else WARN or FAIL with the
    first difference's cause (the non-determinism itself when it is that large)."""
    want = f"relative difference <= {tol:.2g} at every step"
    if not first:
        largest = max(f.value for p, f in seen.items() if p != "samples")
        if noise.value:
            cause, fix = diagnose({}, noise)
            return Result(
                "invariance",
                "WARN",
                largest,
                want,
                f"the runs agree within the tolerance, but {cause} -> fix: {fix}. ({setting})",
            )
        return Result("invariance", "PASS", largest, want, f"the runs agree: {setting}")
    loud = noise if noise.value > tol else None
    cause, fix = diagnose(bad, loud)
    worst = loud or bad[next(p for p in PARTS if p in bad)]
    value = worst.value
    verdict = "FAIL" if value > FAIL_FACTOR * limit(worst, tol) or not math.isfinite(value) else "WARN"
    return Result(
        "invariance",
        verdict,
        value if math.isfinite(value) else None,
        want,
        f"first difference at step {first}: {cause} -> fix: {fix}. ({setting})",
    )


def _part(f: Finding, first: int, tol: float) -> Result:
    """One part's line: the largest difference seen up to the first differing step."""
    name, at = f"invariance/{f.part}", f"step {first}" if first else "every step"
    value = f.value if math.isfinite(f.value) else None
    if f.part == "determinism" and 0 < f.value <= tol:
        return Result(
            name,
            "WARN",
            value,
            "0 (two identical runs agree bit for bit)",
            f"differs: {f.where} (a non-deterministic op)",
        )
    if f.part == "samples":
        if not f.value:
            return Result(name, "PASS", 0.0, "the same global batch", f"the same samples at {at}")
        return Result(
            name,
            "FAIL",
            value,
            "the same global batch",
            f"{f.value:g} sample(s) of the 1-rank batch on no rank at step {first}",
        )
    most = limit(f, tol)
    if not f.value > most:
        return Result(
            name,
            "PASS",
            value,
            f"<= {most:.2g}",
            f"agrees at {at}" + (f" (largest: {f.where})" if f.where and f.value else ""),
        )
    verdict = "FAIL" if value is None or f.value > FAIL_FACTOR * most else "WARN"
    return Result(
        name, verdict, value, f"<= {most:.2g}", f"differs at step {first}" + (f": {f.where}" if f.where else "")
    )


def _json(x: float) -> float | None:
    return x if math.isfinite(x) else None


def module_table(details: dict[str, Any], rows: int = 8) -> str:
    """The first differing forward's modules, in the order they finished, up to the first few
    that differ: where the difference starts, and how it grows."""
    modules, tol = details.get("modules", []), details.get("tolerance", 0.0)
    if not modules:
        return ""
    first_bad = next(i for i, m in enumerate(modules) if m["rel"] is None or m["rel"] > tol)
    shown = modules[max(0, first_bad - 2) : first_bad + rows - 2]
    width = max(len(m["module"]) for m in shown)
    lines = [f"step {details['first_step']}, module outputs (1 rank vs N, sample by sample; tolerance {tol:.2g}):"]
    for m in shown:
        value = "inf" if m["rel"] is None else f"{m['rel']:.3g}"
        note = " <- first" if m is modules[first_bad] else ""
        tags = ", ".join(t for t in (m["kind"] == "bn" and "BatchNorm per rank", m["drew"] and "draws random") if t)
        lines.append(f"  {m['module'].ljust(width)}  {value:>9}  {tags}{note}")
    return "\n".join(lines)


def divergence(ref: Record, rank0: Record) -> dict[str, list[float]]:
    """Per step, the relative difference of each parameter group (a model's top-level module,
    or a numbered block of it) after the step: the curves of the plot."""
    curves: dict[str, list[float]] = {}
    for a, b in zip(ref["steps"], rank0["steps"]):
        groups: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for model, tensors in a["params"].items():
            for name, t in tensors.items():
                parts = name.split(".")
                key = ".".join([model, *parts[: 2 if len(parts) > 2 and parts[1].isdigit() else 1]])
                g = groups.setdefault(key, ([], []))
                g[0].append(b["params"].get(model, {}).get(name, torch.zeros_like(t)).flatten())
                g[1].append(t.flatten())
        for key, (x, y) in groups.items():
            curves.setdefault(key, []).append(rel(torch.cat(x), torch.cat(y)))
    return curves


def plot(details: dict[str, Any], path: Path) -> None:
    """The per-step divergence of each parameter group against the tolerance (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, values in details["curves"].items():
        ax.plot(range(1, len(values) + 1), [max(v, 1e-12) for v in values], marker="o", label=key)
    ax.axhline(details["tolerance"], color="k", linestyle="--", label="tolerance")
    ax.set(
        yscale="log", xlabel="step", ylabel="|N ranks - 1 rank| / |1 rank| (parameters)", title="world-size invariance"
    )
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
