"""Pure PyTorch reference of every computation ptuning_fast does: readable, runs on CPU, and the
oracle that every kernel is tested against. One file per kernel family, named as the kernel."""
from .mask import prompt_attention_mask_reference, prompt_position_ids_reference
from .prefix_kv import encode_prefix_reference, prefix_kv_reference
from .prompt_mlp import prompt_mlp_reference

__all__ = ["encode_prefix_reference", "prefix_kv_reference", "prompt_attention_mask_reference",
           "prompt_position_ids_reference", "prompt_mlp_reference"]
