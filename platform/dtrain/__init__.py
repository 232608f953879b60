"""dtrain: distributed multi-GPU training for PyTorch (DDP, DeepSpeed ZeRO or FSDP2), tracked in MLflow.

The public API, imported on first use (`import dtrain` stays free of torch, and the package, at
the bottom of the layers, imports nothing above it):

- `dtrain.Task`: the supervised task a user subclasses (`dtrain.tasks.supervised.Task`);
- `dtrain.Config`, `dtrain.DataConfig`, `dtrain.ModelConfig`, `dtrain.ConfigError`: a task's
  config sections, and the one-line error of a bad key;
- `dtrain.load_config(recipe, overrides)`: a recipe as the validated config a job trains;
- `dtrain.load(run_dir)`: a finished run's model, for predictions (`dtrain.postrun.predict`);
- `dtrain.sample_generator`, `dtrain.seeded`: a sample's own random stream, for augmentation.
"""

__version__ = "0.1.0"

_API = {
    "Task": "dtrain.tasks.supervised",
    "Config": "dtrain.config.schema",
    "DataConfig": "dtrain.config.schema",
    "ModelConfig": "dtrain.config.schema",
    "ConfigError": "dtrain.errors",
    "load_config": "dtrain.train.config",
    "load": "dtrain.postrun.predict",
    "sample_generator": "dtrain.data.seeding",
    "seeded": "dtrain.data.seeding",
}


def __getattr__(name: str) -> object:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dtrain' has no attribute {name!r}")
