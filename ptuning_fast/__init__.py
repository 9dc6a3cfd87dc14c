"""ptuning_fast: fast, exact P-tuning for Hugging Face models.

Public names only. The compute layer (backend switch, ops) is imported here; everything that
needs transformers or PEFT is imported on first use, so ``import ptuning_fast`` (and
``ptuning_fast.ops``) works without them.

Layers, each importing only the ones before it:
    reference/ -> kernels/ -> ops/              the compute layer (PyTorch oracle, Triton, autograd)
    config.py, p_tuning/, prefix_tuning/        the two prompt methods (PEFT-compatible)
    hf/                                         what is read off transformers models; version drift
    native/                                     the native model: layout, forward, generate, checkpoints
    peft_route.py                               a PeftModel run through the native path
    train/, demo.py, cli.py                     the jobs
"""
from __future__ import annotations

import importlib

from ._validation import value_checks  # where the checks that read tensor values run
from .backend import get_backend, set_backend, use_backend  # the one backend switch
from .ops import build_prompt_attention_mask, build_prompt_position_ids, prefix_kv, prompt_mlp_head

__version__ = "0.1.0"

# name -> module that defines it (imported on first access: these need transformers or PEFT)
_LAZY = {
    "PrefixTuningConfig": "config",
    "PromptEncoderConfig": "config",
    "PromptEncoderReparameterizationType": "config",
    "PromptEncoder": "p_tuning.encoder",
    "PrefixEncoder": "prefix_tuning.encoder",
    "PrefixKVCache": "prefix_tuning.cache",
    "build_prefix_cache": "prefix_tuning.functional",
    "prefix_forward": "prefix_tuning.functional",
    "prefix_generate": "prefix_tuning.functional",
    "PromptOptions": "native.options",
    "PromptTemplate": "native.template",
    "PTuningModel": "native.model",
    "AdapterCheckpointCallback": "native.model",
    "get_ptuning_model": "native.model",
    "load_adapter": "native.model",
    "save_adapter": "native.checkpoint",
    "TextInit": "native.text_init",
    "init_prompts_from_text": "native.text_init",
    "Inspection": "inspect_prompts",
    "inspect_adapter": "inspect_prompts",
    "accelerate": "peft_route",
    "patch_peft": "peft_route",
    "peft_patched": "peft_route",
    "unpatch_peft": "peft_route",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(["build_prompt_attention_mask", "build_prompt_position_ids", "get_backend", "prefix_kv",
                  "prompt_mlp_head", "set_backend", "use_backend", "value_checks", *_LAZY])
