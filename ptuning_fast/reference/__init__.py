"""Pure PyTorch reference of every computation ptuning_fast does: readable, runs on CPU, and the
oracle that every kernel is tested against. One file per kernel family, named as the kernel."""
from .prompt_mlp import prompt_mlp_reference

__all__ = ["prompt_mlp_reference"]
