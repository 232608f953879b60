"""dtrain: distributed multi-GPU training for PyTorch (DDP, DeepSpeed ZeRO or FSDP2), tracked in MLflow."""

__version__ = "0.1.0"
