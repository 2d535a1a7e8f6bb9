"""scGPT model, distributed training on Ray Train + DeepSpeed, checkpoints and inference."""

__version__ = "0.1.0"
