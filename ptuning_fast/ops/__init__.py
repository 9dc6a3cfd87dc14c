"""Autograd-aware ops that dispatch to the reference path or the kernels (see backend.py)."""
from .mask import build_prompt_attention_mask, build_prompt_position_ids
from .prefix_kv import PrefixGeometry, PrefixKVBuffer, PrefixWeights, prefix_kv
from .prompt_mlp import prompt_mlp_head

__all__ = ["PrefixGeometry", "PrefixKVBuffer", "PrefixWeights", "build_prompt_attention_mask",
           "build_prompt_position_ids", "prefix_kv", "prompt_mlp_head"]
