"""The README's engine parity figures, printed: the small character LM the tests train
(tests/helpers.py TINY_LM: 2 CPU ranks, fp32, clipping on, 20 steps) under DDP, DeepSpeed
ZeRO-1/2/3 and FSDP2, as the max absolute parameter difference to the DDP run; FSDP2 with
2 micro-steps, with gradients reduced in bf16, compiled, and stopped and resumed across world
sizes 2 -> 1 -> 2 (asynchronous checkpoints); ZeRO-3 stopped at step 10 and resumed.

    python benchmarks/engine_parity.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))
from helpers import LM, TINY_LM, max_param_diff, run_dtrain  # noqa: E402  (the runs the tests compare)


def train(root: Path, name: str, *overrides: str, nproc: int = 2) -> dict[str, torch.Tensor]:
    proc = run_dtrain(["train", LM, *TINY_LM, f"output_dir={root / name}", *overrides], cwd=root, nproc=nproc)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    path = root / name / "model.pt"
    return torch.load(path, weights_only=True) if path.exists() else {}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ddp = train(root, "ddp")
        zero = {s: train(root, f"zero{s}", "engine=deepspeed", f"deepspeed.zero_stage={s}") for s in (1, 2, 3)}
        z3 = ["engine=deepspeed", "deepspeed.zero_stage=3"]
        train(root, "zero3-resumed", *z3, "train.stop_at_step=10")
        resumed = train(root, "zero3-resumed", *z3, "resume=auto")
        fsdp = {
            "FSDP2": train(root, "fsdp", "engine=fsdp"),
            "FSDP2, 2 micro-steps": train(root, "fsdp-accum", "engine=fsdp", "data.grad_accum_steps=2"),
            "FSDP2, gradients reduced in bf16": train(root, "fsdp-bf16", "engine=fsdp", "fsdp.reduce_dtype=bf16"),
        }
        ac = ["engine=fsdp", "checkpoint.every_steps=4", "checkpoint.async=true"]
        train(root, "fsdp-re", *ac, "train.stop_at_step=8")
        train(root, "fsdp-re", *ac, "train.stop_at_step=14", "resume=auto", nproc=1)
        resharded = train(root, "fsdp-re", *ac, "resume=auto")
        compiled = {e: train(root, f"{e}-compiled", f"engine={e}", "compile=true") for e in ("ddp", "fsdp")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"commit {commit.stdout.strip()}, torch {torch.__version__}")
    for stage, params in zero.items():
        print(f"DeepSpeed ZeRO-{stage} vs DDP: max |param diff| {max_param_diff(ddp, params):.2g}")
    print(
        f"ZeRO-3 stopped at 10 and resumed vs straight through: max |param diff| {max_param_diff(zero[3], resumed):.2g}"
    )
    for name, params in fsdp.items():
        print(f"{name} vs DDP: max |param diff| {max_param_diff(ddp, params):.2g}")
    print(
        f"FSDP2 2 ranks -> 1 rank -> 2 ranks (resumed at 8 and 14) vs FSDP2 straight: max |param diff| "
        f"{max_param_diff(fsdp['FSDP2'], resharded):.2g}"
    )
    print(f"compiled vs eager, DDP: max |param diff| {max_param_diff(ddp, compiled['ddp']):.2g}")
    print(f"compiled vs eager, FSDP2: max |param diff| {max_param_diff(fsdp['FSDP2'], compiled['fsdp']):.2g}")


if __name__ == "__main__":
    main()
