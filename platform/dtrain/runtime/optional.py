"""Optional libraries, imported only by the paths that use them, with one line naming the extra
to install when one is missing.

torchvision is imported here also where its compiled ops cannot load against the installed
torch (PyPI's CUDA torchvision wheel beside a CPU-only torch): its import registers fake
kernels for two of those ops, so their schemas are declared first. Models and transforms are
pure Python; only torchvision.ops' compiled kernels (nms, roi_align, ...) stay unavailable.
`transformers` imports torchvision whenever it is installed, so it goes through here too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from dtrain.errors import ConfigError


def require(module: str, extra: str, key: str, value: object) -> ModuleType:
    """`module`, or a ConfigError on `key`=`value` saying which extra brings it."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(key, value, f'needs {module}: pip install -e ".[{extra}]"')
    return importlib.import_module(module)


def declare_torchvision_ops() -> None:
    """Load torchvision's compiled ops, or declare the two its import needs when they cannot load."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    libs = sorted(Path(spec.origin).parent.glob("_C*.so"))
    try:
        torch.ops.load_library(str(libs[0]))
    except (OSError, RuntimeError, IndexError):
        for op in ("nms", "qnms"):
            if not torch._C._dispatch_has_kernel(f"torchvision::{op}"):
                torch.library.define(
                    f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
                )


def torchvision(key: str, value: object) -> ModuleType:
    if importlib.util.find_spec("torchvision") is not None:
        declare_torchvision_ops()
    return require("torchvision", "vision", key, value)


def transformers(key: str, value: object) -> ModuleType:
    if importlib.util.find_spec("transformers") is not None:
        declare_torchvision_ops()
        if not torch.cuda.is_available():  # saving imports DeepSpeed, which warns when it has to guess the device
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # transformers' own advisory logging (config sanity notes, "training from scratch")
        # would repeat on every rank; its errors still raise.
        logging = importlib.import_module("transformers").logging
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    return require("transformers", "hf", key, value)


def datasets(key: str, value: object) -> ModuleType:
    module = require("datasets", "hf", key, value)
    module.logging.set_verbosity_error()
    module.disable_progress_bars()  # a bar per rank per file interleaves with the run's own lines
    return module


def tokenizer(path: str, key: str = "data.tokenizer") -> Any:
    """A Hugging Face tokenizer saved locally: a `save_pretrained` folder (AutoTokenizer, never
    remote code) or a `tokenizers` tokenizer.json. Nothing is downloaded."""
    hf = transformers(key, path)
    p = Path(path)
    if not p.exists():
        raise ConfigError(key, path, "no such file or folder (a save_pretrained folder or tokenizer.json)")
    if p.is_file():
        return hf.PreTrainedTokenizerFast(tokenizer_file=str(p))
    return hf.AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
