"""The compute layer's public ops: validate, then dispatch to the PyTorch reference or the kernels;
every autograd Function of the package lives here. Imports neither transformers nor PEFT."""
from .mask import build_prompt_attention_mask, build_prompt_position_ids, packed_prompt_layout, prompt_padding_mask
from .prefix_cache import PrefixKVBuffer
from .prefix_kv import PrefixGeometry, PrefixWeights, prefix_kv
from .prompt_mlp import prompt_mlp_head

__all__ = ["PrefixGeometry", "PrefixKVBuffer", "PrefixWeights", "build_prompt_attention_mask",
           "build_prompt_position_ids", "packed_prompt_layout", "prefix_kv", "prompt_mlp_head", "prompt_padding_mask"]
