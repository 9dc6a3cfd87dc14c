"""ptuning_fast: fast, exact P-tuning for Hugging Face models.

Public names only; each lives in the module named beside it.
"""
from .backend import get_backend, set_backend, use_backend  # the one backend switch
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .prompt_encoder import PromptEncoder
from .ops import prompt_mlp_head

__version__ = "0.1.0"

__all__ = [
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "get_backend",
    "prompt_mlp_head",
    "set_backend",
    "use_backend",
]
