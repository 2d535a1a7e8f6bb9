"""Training: the Ray Train driver and worker loop, the DeepSpeed train module, callbacks, checkpoints and
their storage, MLflow tracking, the model registry, warm start and preemption handling."""
