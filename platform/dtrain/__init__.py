"""dtrain: distributed multi-GPU training for PyTorch (DDP or DeepSpeed), tracked in MLflow."""

__version__ = "0.1.0"
