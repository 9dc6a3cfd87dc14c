"""Helpers of the training-job tests (the fixtures are in conftest.py)."""
from ptuning_fast import train
from ptuning_fast.train import TrainConfig


def tiny_config(model, **overrides) -> TrainConfig:
    # CPU even where CUDA exists: exact comparisons, and two ranks cannot share one GPU under NCCL.
    options = dict(model=model, batch_size=8, eval_batch_size=64, steps=3, num_virtual_tokens=3,
                   encoder_hidden_size=16, lr=1e-2, eval_every=0, progress=False, max_length=24, device="cpu")
    options.update(overrides)
    return TrainConfig(**options)


def trainable_state(model) -> dict:
    return {k: v.detach().clone() for k, v in train.trainable_parameters(model).items()}
