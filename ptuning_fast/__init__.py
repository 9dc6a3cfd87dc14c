"""ptuning_fast: fast, exact P-tuning for Hugging Face models.

Public names only; each lives in the module named beside it.
"""
from .backend import get_backend, set_backend, use_backend  # the one backend switch
from .config import PrefixTuningConfig, PromptEncoderConfig, PromptEncoderReparameterizationType
from .prompt_encoder import PromptEncoder
from .prefix_encoder import PrefixEncoder
from .ops import build_prompt_attention_mask, build_prompt_position_ids, prefix_kv, prompt_mlp_head
from .integrations.cache import PrefixKVCache  # deep prompt written into the KV cache
from .integrations.prefix import build_prefix_cache, prefix_forward, prefix_generate
from .integrations.model import PromptOptions, PromptTemplate, PTuningModel, get_ptuning_model  # native API
from .integrations.peft import accelerate, patch_peft, peft_patched, unpatch_peft  # PEFT in one line
from .integrations.checkpoint import load_adapter, save_adapter  # PEFT's adapter format, resumable

__version__ = "0.1.0"

__all__ = [
    "PrefixEncoder",
    "PrefixKVCache",
    "PrefixTuningConfig",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptOptions",
    "PromptTemplate",
    "PTuningModel",
    "accelerate",
    "build_prefix_cache",
    "build_prompt_attention_mask",
    "build_prompt_position_ids",
    "get_backend",
    "get_ptuning_model",
    "load_adapter",
    "patch_peft",
    "peft_patched",
    "prefix_forward",
    "prefix_generate",
    "prefix_kv",
    "prompt_mlp_head",
    "save_adapter",
    "set_backend",
    "unpatch_peft",
    "use_backend",
]
