"""dtrain: distributed multi-GPU training for PyTorch (DDP, DeepSpeed ZeRO or FSDP2), tracked in MLflow."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`dtrain.load(run_dir)` (see `dtrain.postrun.predict`), imported on first use: `import dtrain`
    stays free of torch, and the package, at the bottom of the layers, imports nothing above."""
    if name == "load":
        import importlib

        return importlib.import_module("dtrain.postrun.predict").load
    raise AttributeError(f"module 'dtrain' has no attribute {name!r}")
