"""``prompt_mlp_head``: the P-tuning MLP head, dispatched to the reference or the Triton kernels."""
from __future__ import annotations

from typing import Sequence

import torch

from .._validation import FLOAT_DTYPES, check_tensor
from ..backend import resolve_backend
from ..reference.prompt_mlp import Layer, prompt_mlp_reference


def _check_layers(x: torch.Tensor, layers: Sequence[Layer]) -> None:
    check_tensor(x, "x", dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("`x` must have at least 1 dimension (..., in_features)")
    if not isinstance(layers, (list, tuple)) or len(layers) == 0:
        raise ValueError("`layers` must be a non-empty list of (weight, bias) pairs")
    width = x.shape[-1]
    for i, layer in enumerate(layers):
        if not isinstance(layer, (list, tuple)) or len(layer) != 2:
            raise ValueError(f"`layers[{i}]` must be a (weight, bias) pair")
        weight, bias = layer
        check_tensor(weight, f"layers[{i}].weight", ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
        if weight.shape[1] != width:
            raise ValueError(f"`layers[{i}].weight` has in_features {weight.shape[1]}, expected {width}")
        if bias is not None:
            check_tensor(bias, f"layers[{i}].bias", ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"`layers[{i}].bias` has {bias.shape[0]} elements, expected {weight.shape[0]}")
        width = weight.shape[0]


def prompt_mlp_head(x: torch.Tensor, layers: Sequence[Layer]) -> torch.Tensor:
    """``Linear -> ReLU -> ... -> Linear`` over the last dim of ``x`` (differentiable).

    ``layers`` are (weight, bias) pairs as in ``nn.Linear``. Honors ``torch.autocast``.
    """
    _check_layers(x, layers)
    if resolve_backend(x.device) == "triton":
        from ..kernels.prompt_mlp import prompt_mlp_triton

        return prompt_mlp_triton(x, layers)
    return prompt_mlp_reference(x, layers)
