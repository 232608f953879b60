"""The README's DeepSpeed parity figures, printed: the small character LM of
tests/test_deepspeed.py (2 CPU ranks, fp32, clipping on, 20 steps) under DDP and under
DeepSpeed ZeRO-1, -2 and -3, as the max absolute parameter difference to the DDP run; and
ZeRO-3 stopped at step 10 and resumed, against ZeRO-3 run straight through.

    python benchmarks/deepspeed_parity.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import max_param_diff, run_dtrain  # noqa: E402  (the tests' launcher: the CLI's torchrun builder)
from test_deepspeed import LM, TINY  # noqa: E402  (the very runs the tests compare)


def train(root: Path, name: str, *overrides: str) -> dict[str, torch.Tensor]:
    proc = run_dtrain(["train", LM, *TINY, f"output_dir={root / name}", *overrides], cwd=root, nproc=2)
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
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"commit {commit.stdout.strip()}, torch {torch.__version__}")
    for stage, params in zero.items():
        print(f"DeepSpeed ZeRO-{stage} vs DDP: max |param diff| {max_param_diff(ddp, params):.2g}")
    print(f"ZeRO-3 stopped at 10 and resumed vs straight through: max |param diff| "
          f"{max_param_diff(zero[3], resumed):.2g}")


if __name__ == "__main__":
    main()
