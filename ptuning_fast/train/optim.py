"""The optimizer (AdamW, or SGD with momentum) and its learning-rate schedule."""
from __future__ import annotations

import torch

from .config import TrainConfig, check_config


def make_optimizer(params: list, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum 0.9, over the trainable parameters."""
    check_config(config)
    if not isinstance(params, (list, tuple)) or not params:
        raise ValueError("`params` must be a non-empty list of the parameters to train")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def learning_rate_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0."""
    check_config(config)
    if isinstance(step, bool) or not isinstance(step, int) or isinstance(total_steps, bool) or \
            not isinstance(total_steps, int) or not 0 <= step < total_steps:
        raise ValueError(f"`step` must be an int in [0, total_steps); got step={step!r}, total_steps={total_steps!r}")
    warmup = int(total_steps * config.warmup_ratio)
    if step < warmup:
        return config.learning_rate * (step + 1) / (warmup + 1)
    return config.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


__all__ = ["learning_rate_at", "make_optimizer"]
