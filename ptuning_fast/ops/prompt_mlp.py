"""``prompt_mlp_head``: the P-tuning MLP head, dispatched to the reference or the Triton kernels."""
from __future__ import annotations

from typing import Sequence

import torch

from .._validation import FLOAT_DTYPES, check_tensor
from ..backend import resolve_backend
from ..reference.prompt_mlp import Layer, prompt_mlp_reference

# Hidden sizes the kernels are built and tested for (one program holds a few rows of a layer).
MAX_FEATURES = 8192


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): never autocast
        return False


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
    if not _autocast_enabled(x.device.type):
        # Without autocast F.linear needs one dtype throughout; say which tensor differs.
        for i, (weight, bias) in enumerate(layers):
            for name, t in ((f"layers[{i}].weight", weight), (f"layers[{i}].bias", bias)):
                if t is not None and t.dtype != x.dtype:
                    raise TypeError(f"`{name}` has dtype {t.dtype} but `x` has {x.dtype}: outside "
                                    "torch.autocast, x, weights and biases must share one dtype")


def _plainly_valid(x, layers) -> bool:
    """True when the arguments are certainly valid: a fast pass without messages, run every call.
    Anything else goes through ``_check_layers``, which names the problem."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        return False
    if not isinstance(layers, (list, tuple)) or not layers:
        return False
    device, dtype, width = x.device, x.dtype, x.shape[-1]
    one_dtype = not _autocast_enabled(device.type)
    for layer in layers:
        if not isinstance(layer, (list, tuple)) or len(layer) != 2:
            return False
        weight, bias = layer
        if (not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != width
                or weight.device != device or weight.dtype not in FLOAT_DTYPES or (one_dtype and weight.dtype != dtype)):
            return False
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]
                                 or bias.device != device or bias.dtype not in FLOAT_DTYPES
                                 or (one_dtype and bias.dtype != dtype)):
            return False
        width = weight.shape[0]
    return True


def _kernels_apply(x: torch.Tensor, layers: Sequence[Layer]) -> bool:
    """The kernels cover fp32/bf16/fp16, 1..8192 features; fp64 (the oracle dtype) and empty
    inputs take the reference, which is exact for them."""
    tensors = [x] + [t for layer in layers for t in layer if t is not None]
    if any(t.dtype == torch.float64 for t in tensors) or x.numel() == 0:
        return False
    widths = [x.shape[-1]] + [weight.shape[0] for weight, _ in layers]
    return max(widths) <= MAX_FEATURES


def prompt_mlp_head(x: torch.Tensor, layers: Sequence[Layer]) -> torch.Tensor:
    """``Linear -> ReLU -> ... -> Linear`` over the last dim of ``x`` (differentiable).

    ``x``: (..., in_features); ``layers``: (weight (out, in), bias (out,) or None) pairs as in
    ``nn.Linear``, ReLU between consecutive layers. Returns (..., out_features of the last layer).
    Honors ``torch.autocast`` as ``F.linear`` does. On CUDA (backend ``auto``/``triton``) it runs the
    fused Triton kernels: one launch per layer forward and one per layer backward (for up to 128
    rows), weight and bias gradients accumulated in fp32.

    Raises TypeError / ValueError naming the argument for a wrong type, shape, dtype or device.
    """
    if not _plainly_valid(x, layers):
        _check_layers(x, layers)
    if resolve_backend(x.device) == "triton" and _kernels_apply(x, layers):
        from ..kernels.prompt_mlp import prompt_mlp_triton

        return prompt_mlp_triton(x, layers)
    return prompt_mlp_reference(x, layers)
