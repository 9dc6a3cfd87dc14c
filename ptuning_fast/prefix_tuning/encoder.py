"""``PrefixEncoder``: a drop-in for ``peft.tuners.prefix_tuning.PrefixEncoder`` (P-Tuning v2).

Same constructor (a ``PrefixTuningConfig``, ours or PEFT's), submodule names and ``state_dict``
keys (``embedding.weight``, ``transform.{0,2}.{weight,bias}``), initialisation (PEFT's own
``__init__`` runs, so seed-for-seed the same weights, ``init_weights="zero"`` included) and the
same ``forward(prefix) -> (B, T, num_layers * 2 * token_dim)``. What differs is how it is used:

- :meth:`prefix_weights` hands the parameters to :func:`ptuning_fast.ops.prefix_kv` /
  :class:`ptuning_fast.ops.prefix_cache.PrefixKVBuffer`, which encode the T distinct virtual
  tokens once and write every layer's K/V prefix straight into the KV cache (see
  :func:`ptuning_fast.prefix_tuning.functional.build_prefix_cache`).
- Nothing derived from the parameters is kept between calls (a cache built for one
  ``generate()`` call holds the prefix for that call only).
- ``forward`` encodes each distinct token once and gathers (an expanded view when every row is
  the same).

GQA/MQA models: as PEFT, ``token_dim = num_key_value_heads * head_dim`` and
``num_attention_heads = num_key_value_heads`` once the config is filled from the model
(``peft.utils.other._prepare_prompt_learning_config``, which PEFT runs when wrapping a model).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.prefix_tuning.model import PrefixEncoder as _PeftPrefixEncoder

from .._validation import INDEX_DTYPES, check_config_int, check_index_range, check_positive_int, check_tensor
from ..config import PrefixTuningConfig, read_encoder_config
from ..ops.prefix_kv import PrefixWeights
from ..reference.prefix_kv import encode_prefix_reference


def _read_config(config) -> PrefixTuningConfig:
    """Accept ours, PEFT's or any object with the fields; validate what the encoder needs."""
    config = read_encoder_config(PrefixTuningConfig, config, "PrefixEncoder")
    for name in ("token_dim", "num_layers"):
        check_config_int(config, name, "the model's config")
    if config.num_attention_heads is not None:
        check_positive_int(config.num_attention_heads, "num_attention_heads")
        if config.token_dim % config.num_attention_heads:
            raise ValueError(f"`token_dim` ({config.token_dim}) must be a multiple of `num_attention_heads` "
                             f"({config.num_attention_heads}, the KV heads the prefix feeds)")
    if config.prefix_projection and not config.inference_mode:
        check_config_int(config, "encoder_hidden_size", "token_dim")
    return config


def prefix_weights_of(encoder, name: str = "encoder") -> PrefixWeights:
    """The :class:`~ptuning_fast.ops.prefix_kv.PrefixWeights` of a prefix encoder: ours, PEFT's
    ``PrefixEncoder`` (the same submodules), or a ``PrefixWeights`` given directly."""
    if isinstance(encoder, PrefixWeights):
        return encoder
    if isinstance(encoder, PrefixEncoder):
        return encoder.prefix_weights()
    if not isinstance(getattr(encoder, "embedding", None), torch.nn.Embedding):
        raise TypeError(f"`{name}` must be a PrefixEncoder (ours or PEFT's) or a PrefixWeights, "
                        f"got {type(encoder).__name__}")
    return _module_weights(encoder)


def _module_weights(encoder) -> PrefixWeights:
    """PEFT's PrefixEncoder layout: ``embedding``, and ``transform[0]`` / ``transform[2]`` when it
    projects (``prefix_projection`` outside inference mode)."""
    transform = getattr(encoder, "transform", None)
    if getattr(encoder, "prefix_projection", False) and transform is not None:
        first, last = transform[0], transform[2]
        return PrefixWeights(encoder.embedding.weight, first.weight, first.bias, last.weight, last.bias)
    return PrefixWeights(encoder.embedding.weight)


class PrefixEncoder(_PeftPrefixEncoder):
    """Prefix-tuning encoder, interchangeable with PEFT's (it is an instance of PEFT's class).

    Input of ``forward``: indices (B, T) into the ``num_virtual_tokens`` virtual tokens.
    Output: (B, T, num_layers * 2 * token_dim), PEFT's flat layout
    (column ``((layer * 2 + k/v) * kv_heads + head) * head_dim + channel``).
    """

    def __init__(self, config):
        config = _read_config(config)
        super().__init__(config)  # PEFT's own construction: same modules, same RNG stream
        self.num_virtual_tokens = config.num_virtual_tokens
        self.token_dim = config.token_dim
        self.num_layers = config.num_layers
        # KV heads and head size, when the config knows them (filled from a model by PEFT).
        self.num_kv_heads: Optional[int] = config.num_attention_heads
        self.head_dim: Optional[int] = (config.token_dim // config.num_attention_heads
                                        if config.num_attention_heads else None)

    # ----------------------------------------------------------------------------------------
    @property
    def projected(self) -> bool:
        """True when the prefix is ``transform(embedding)`` (``prefix_projection`` in training mode)."""
        return self.prefix_projection and hasattr(self, "transform")

    @property
    def width(self) -> int:
        """Values per virtual token: ``num_layers * 2 * token_dim``."""
        return self.num_layers * 2 * self.token_dim

    def encoded_prefix(self) -> torch.Tensor:
        """The T virtual tokens encoded, ``(T, num_layers * 2 * token_dim)``, in the parameters' dtype,
        computed from the current parameters."""
        if not self.projected:
            return self.embedding.weight
        return encode_prefix_reference(*self.prefix_weights())

    def prefix_weights(self) -> PrefixWeights:
        """The parameters, as :func:`ptuning_fast.ops.prefix_kv` takes them (the kernels compute
        the projection, fused with writing the cache)."""
        return _module_weights(self)

    # ----------------------------------------------------------------------------------------
    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight
        check_tensor(prefix, "prefix", ndim=2, dtypes=INDEX_DTYPES, device=weight.device)
        check_index_range(prefix, self.num_virtual_tokens, "prefix")
        if prefix.dtype not in (torch.int64, torch.int32):
            prefix = prefix.long()
        table = self.encoded_prefix()  # each distinct token encoded once
        batch = prefix.shape[0]
        if batch == 1 or prefix.stride(0) == 0:  # one row, or one row expanded over the batch
            return F.embedding(prefix[:1], table).expand(batch, -1, -1)
        return F.embedding(prefix, table)


__all__ = ["PrefixEncoder"]
