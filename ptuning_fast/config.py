"""Configs: PEFT's own classes, subclassed so that PEFT accepts ours and we accept PEFT's.

``PromptEncoderConfig`` is a ``peft.PromptEncoderConfig`` (same fields, defaults and
``peft_type``) whose ``encoder_reparameterization_type`` is normalised to the enum (a string
works everywhere) and checked when the config is made, with PEFT's error text.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from peft import PrefixTuningConfig as _PeftPrefixTuningConfig
from peft import PromptEncoderConfig as _PeftPromptEncoderConfig
from peft.tuners.p_tuning.config import PromptEncoderReparameterizationType

from ._validation import check_positive_int

# Sane upper bounds of a config's sizes, checked before anything is allocated (an adapter_config.json
# or command line asking for 10**9 virtual tokens must fail in a line, not after allocating 100 GB).
SIZE_LIMITS = {
    "num_virtual_tokens": 2**14,  # prompts of thousands of tokens already leave little room for text
    "token_dim": 2**15,  # the widest released models are 16-25k wide
    "encoder_hidden_size": 2**15,
    "encoder_num_layers": 64,  # the LSTM encoder's depth (PEFT uses 2)
    "num_layers": 2**10,
    "num_attention_heads": 2**10,
    "num_transformer_submodules": 2,
}


def check_sizes(config) -> None:
    """Refuse a size over :data:`SIZE_LIMITS` (or not a positive int), naming the field and its limit."""
    for name, limit in SIZE_LIMITS.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        check_positive_int(value, name)
        if value > limit:
            raise ValueError(f"`{name}` ({value}) is over the limit of {limit}: sizes are bounded before anything is "
                             f"allocated ({', '.join(f'{k} <= {v}' for k, v in SIZE_LIMITS.items())})")


ENCODER_TYPE_ERROR = "Prompt encoder type not recognized. Please use one of MLP (recommended) or LSTM."


def normalize_encoder_type(value) -> PromptEncoderReparameterizationType:
    try:
        return PromptEncoderReparameterizationType(value)
    except ValueError:
        raise ValueError(f"{ENCODER_TYPE_ERROR} Got encoder_reparameterization_type={value!r}.") from None


def config_from_peft(cls, config):
    """Build ``cls`` from any config object carrying the same fields (a PEFT config, a dict...)."""
    if isinstance(config, cls):
        return config
    source = config if isinstance(config, dict) else vars(config)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in source.items() if k in names})


def read_encoder_config(cls, config, encoder: str):
    """``config`` (ours, PEFT's, or any object with the fields) as ``cls``, for the encoder named
    ``encoder``; a config of the other prompt method is refused by name."""
    if not hasattr(config, "num_virtual_tokens"):
        raise TypeError(f"`config` must be a {cls.__name__} (ours or PEFT's), got {type(config).__name__}")
    peft_type = getattr(config, "peft_type", None)
    wanted = _PEFT_TYPES[cls]
    if peft_type is not None and str(getattr(peft_type, "value", peft_type)) != wanted:
        raise TypeError(f"`config` is a {type(config).__name__} ({getattr(peft_type, 'value', peft_type)}), but "
                        f"{encoder} needs a {cls.__name__} ({wanted}): the config is for the other prompt method")
    config = cls.from_peft(config)
    check_positive_int(config.num_virtual_tokens, "num_virtual_tokens")
    return config


@dataclass
class PromptEncoderConfig(_PeftPromptEncoderConfig):
    """``peft.PromptEncoderConfig`` with the encoder type normalised and validated."""

    def __post_init__(self):
        super().__post_init__()
        self.encoder_reparameterization_type = normalize_encoder_type(self.encoder_reparameterization_type)
        check_sizes(self)

    @classmethod
    def from_peft(cls, config) -> "PromptEncoderConfig":
        return config_from_peft(cls, config)


PREFIX_INIT_WEIGHTS = (None, "zero")


@dataclass
class PrefixTuningConfig(_PeftPrefixTuningConfig):
    """``peft.PrefixTuningConfig`` (same fields, defaults and ``peft_type``) for P-Tuning v2;
    ``init_weights`` is checked when the config is made (``None`` for random, or ``"zero"``)."""

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in PREFIX_INIT_WEIGHTS:
            raise ValueError(f"`init_weights` must be None (random) or \"zero\", got {self.init_weights!r}")
        check_sizes(self)

    @classmethod
    def from_peft(cls, config) -> "PrefixTuningConfig":
        return config_from_peft(cls, config)


_PEFT_TYPES = {PromptEncoderConfig: "P_TUNING", PrefixTuningConfig: "PREFIX_TUNING"}

__all__ = ["SIZE_LIMITS", "PrefixTuningConfig", "PromptEncoderConfig", "PromptEncoderReparameterizationType",
           "check_sizes", "normalize_encoder_type", "read_encoder_config"]
