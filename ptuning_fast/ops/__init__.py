"""Autograd-aware ops that dispatch to the reference path or the kernels (see backend.py)."""
from .prompt_mlp import prompt_mlp_head

__all__ = ["prompt_mlp_head"]
