"""Accelerate an existing PEFT model in one line: ``ptuning_fast.accelerate(peft_model)``.

For every ``P_TUNING`` and ``PREFIX_TUNING`` adapter of a ``PeftModel``, in place:

- the encoder becomes this package's drop-in (``PromptEncoder`` / ``PrefixEncoder``) holding the
  very same ``Parameter`` objects, so trained weights, optimizers already built on them, DDP and
  hooks keep working;
- ``get_prompt`` is routed here: v1 prompts are the encoder's encoded tokens broadcast over
  the batch (encoded once per call, not once per row), deep
  prompts go straight into the prefix cache (:func:`ptuning_fast.prefix_tuning.functional.build_prefix_cache`);
- the first forward over a prefilled prefix gets its 4D attention mask from the fused builder
  (:func:`ptuning_fast.build_prompt_attention_mask`) instead of transformers' mask functions.

PEFT's own ``forward``, ``generate``, ``save_pretrained`` and the rest stay as they are, so the
results are unchanged (PEFT's behaviour included: for PEFT-compatible improvements such as
templates, left-padding-aware positions or token-classification labels, use
:func:`ptuning_fast.get_ptuning_model`).

``patch_peft()`` makes ``get_peft_model`` and ``PeftModel.from_pretrained`` build accelerated
models directly; ``unpatch_peft()`` undoes it; ``with peft_patched(): ...`` does both.
"""
from __future__ import annotations

import contextlib
import types
import warnings

import torch
from peft import PeftModel, PeftType
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.constants import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING

from .hf.compat import get_cache
from .native.adapters import encoded_prompt_table
from .native.forward import fused_prefix_mask
from .p_tuning.encoder import PromptEncoder
from .prefix_tuning.encoder import PrefixEncoder, prefix_weights_of
from .prefix_tuning.functional import prefix_cache_for

_ATTRIBUTE = "_ptuning_fast"  # per-model state of the acceleration (hook handle)
_PREFIX_LENGTH = "_ptuning_fast_prefix_length"  # set on the caches built here


_FAST_ENCODERS = {PeftType.P_TUNING: PromptEncoder, PeftType.PREFIX_TUNING: PrefixEncoder}


def _rebuild_with_same_parameters(encoder, cls, config):
    """A ``cls`` encoder whose parameters ARE ``encoder``'s (same objects): built on the meta
    device (no allocation, no draw from the random generator), then given the old parameters."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # PEFT already warned about the same config when it built its encoder
        fast = cls(config)
    old = dict(encoder.named_parameters())
    new = dict(fast.named_parameters())
    if set(old) != set(new):
        raise RuntimeError(f"cannot swap {type(encoder).__name__} for {cls.__name__}: parameters differ "
                           f"({sorted(set(old) ^ set(new))})")
    for name, parameter in old.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = fast.get_submodule(owner_name) if owner_name else fast
        setattr(owner, leaf, parameter)
    for name, buffer in encoder.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        (fast.get_submodule(owner_name) if owner_name else fast).register_buffer(leaf, buffer)
    leftover = [n for n, t in list(fast.named_parameters()) + list(fast.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"cannot swap {type(encoder).__name__} for {cls.__name__}: {leftover} were not carried over")
    for module in fast.modules():
        if isinstance(module, torch.nn.RNNBase):
            module.flatten_parameters()  # the carried-over weights, laid out for cuDNN as PEFT's were
    fast.train(encoder.training)
    return fast


def _peft_handles_prefix_itself(peft_model, config) -> bool:
    """Models whose prefix PEFT post-processes (bloom, gemma...) keep PEFT's own prefix path."""
    model_type = getattr(peft_model.get_base_model().config, "model_type", "")
    return (model_type in TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING
            or any(name in model_type for name in ("gemma2", "gemma3", "gemma4")))


def _fast_get_prompt(self, batch_size: int, task_ids=None, max_cache_len=None):
    """``PeftModel.get_prompt``, routed through this package (same values, fewer copies)."""
    config = self.active_peft_config
    encoder = self.prompt_encoder[self.active_adapter]
    if config.peft_type == PeftType.P_TUNING:
        table = encoded_prompt_table(encoder, config)
        return table.unsqueeze(0).expand(batch_size, -1, -1)
    if config.peft_type == PeftType.PREFIX_TUNING and not _peft_handles_prefix_itself(self, config):
        text_length = max((max_cache_len or 0) - config.num_virtual_tokens, 0)  # PEFT's forward passes S + P
        cache = prefix_cache_for(self.get_base_model(), [prefix_weights_of(encoder)], None, batch_size,
                                 seq_len=text_length, dtype=self.base_model_torch_dtype)
        if config.num_transformer_submodules == 1:  # the fused mask; not seq2seq (its decoder builds its own)
            setattr(cache, _PREFIX_LENGTH, config.num_virtual_tokens)
        return cache
    return type(self).get_prompt(self, batch_size, task_ids=task_ids, max_cache_len=max_cache_len)


def _prefix_mask_hook(module, args, kwargs):
    """Forward pre-hook of the base model: over a freshly prefilled prefix (our cache, holding only
    the prefix), replace PEFT's 2D ``cat(ones, mask)`` by the fused 4D mask."""
    cache = get_cache(kwargs)
    prefix = getattr(cache, _PREFIX_LENGTH, None)
    mask = kwargs.get("attention_mask")
    if prefix is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] <= prefix:
        return None
    if cache.get_seq_length() != prefix:  # later generation steps: transformers builds the mask
        return None
    fused = fused_prefix_mask(module, mask[:, prefix:], prefix)
    if fused is None:
        return None
    kwargs["attention_mask"] = fused
    return args, kwargs


def accelerate(peft_model):
    """Route an existing ``PeftModel``'s P-tuning / prefix-tuning steps through ptuning_fast, in place.

    Keeps the trained weights (the same ``Parameter`` objects) and gives the same results; returns
    ``peft_model``. Adapters of other PEFT types are left alone. Calling it again is harmless.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"`peft_model` must be a peft.PeftModel, got {type(peft_model).__name__}")
    if not getattr(peft_model, "_is_prompt_learning", False):
        raise ValueError("`peft_model` holds no prompt-learning adapter (P_TUNING / PREFIX_TUNING): "
                         f"its PEFT type is {peft_model.active_peft_config.peft_type.value}")
    for name, encoder in list(peft_model.prompt_encoder.items()):
        config = peft_model.peft_config[name]
        cls = _FAST_ENCODERS.get(config.peft_type)
        if cls is not None and not isinstance(encoder, cls):
            peft_model.prompt_encoder[name] = _rebuild_with_same_parameters(encoder, cls, config)
    if "get_prompt" not in peft_model.__dict__:
        peft_model.get_prompt = types.MethodType(_fast_get_prompt, peft_model)
    if _ATTRIBUTE not in peft_model.__dict__:
        # PEFT calls the whole model, or for some heads (BERT classification...) its backbone alone.
        base = peft_model.get_base_model()
        targets = [base]
        backbone_name = peft_model.__dict__.get("transformer_backbone_name")
        if backbone_name:
            backbone = base.get_submodule(backbone_name)
            if backbone is not base:
                targets.append(backbone)
        handles = [m.register_forward_pre_hook(_prefix_mask_hook, with_kwargs=True) for m in targets]
        peft_model.__dict__[_ATTRIBUTE] = {"mask_hooks": handles}
    return peft_model


def is_accelerated(peft_model) -> bool:
    """Whether :func:`accelerate` has been applied to ``peft_model``."""
    return isinstance(peft_model, PeftModel) and _ATTRIBUTE in peft_model.__dict__


# ---------------------------------------------------------------------------------------------
# Make PEFT build accelerated models directly
# ---------------------------------------------------------------------------------------------
_saved = {}


def patch_peft() -> None:
    """From now on ``get_peft_model`` / ``PeftModel.from_pretrained`` (and ``add_adapter``) build
    this package's encoders and accelerated models. Undo with :func:`unpatch_peft`."""
    if _saved:
        return
    _saved["tuners"] = {t: PEFT_TYPE_TO_TUNER_MAPPING[t] for t in (PeftType.P_TUNING, PeftType.PREFIX_TUNING)}
    _saved["setup"] = PeftModel.__dict__["_setup_prompt_encoder"]
    PEFT_TYPE_TO_TUNER_MAPPING.update(_FAST_ENCODERS)
    original_setup = _saved["setup"]

    def _setup_prompt_encoder(self, adapter_name: str):
        original_setup(self, adapter_name)
        accelerate(self)

    PeftModel._setup_prompt_encoder = _setup_prompt_encoder


def unpatch_peft() -> None:
    """Undo :func:`patch_peft` (models built meanwhile stay accelerated)."""
    if not _saved:
        return
    PEFT_TYPE_TO_TUNER_MAPPING.update(_saved["tuners"])
    PeftModel._setup_prompt_encoder = _saved["setup"]
    _saved.clear()


def is_peft_patched() -> bool:
    return bool(_saved)


@contextlib.contextmanager
def peft_patched():
    """``with peft_patched(): model = get_peft_model(...)``: PEFT builds accelerated models inside."""
    was_patched = is_peft_patched()
    patch_peft()
    try:
        yield
    finally:
        if not was_patched:
            unpatch_peft()


__all__ = ["accelerate", "is_accelerated", "is_peft_patched", "patch_peft", "peft_patched", "unpatch_peft"]
