"""``prompt_mlp_head``: the P-tuning MLP head, dispatched to the reference or the Triton kernels.

On the kernels, an ``autograd.Function`` calls the launchers of :mod:`ptuning_fast.kernels.prompt_mlp`
directly in eager mode (the lowest per-call overhead); under ``torch.compile`` it calls them
through the two kernel ops ``ptuning_fast::prompt_mlp_forward`` / ``_backward`` (Triton ops
whose kernels the compiled graph holds; see :func:`ptuning_fast.kernels._common.kernel_op`), so
Dynamo traces the whole head without a graph break.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

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
    rows; in exact fp32 two, the split loop and the sum of its partials), weight and bias gradients
    accumulated in fp32.

    Raises TypeError / ValueError naming the argument for a wrong type, shape, dtype or device.
    """
    if not _plainly_valid(x, layers):
        _check_layers(x, layers)
    if resolve_backend(x.device) == "triton" and _kernels_apply(x, layers):
        return prompt_mlp_triton(x, layers)
    return prompt_mlp_reference(x, layers)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
class PromptMLPFunction(torch.autograd.Function):
    """``apply(x2d, compute_dtype, W1, b1, W2, b2, ...)``; a bias may be None."""

    @staticmethod
    def forward(ctx, x, compute_dtype, *params):
        from ..kernels.prompt_mlp import mlp_forward, mlp_forward_op

        weights, biases = list(params[0::2]), list(params[1::2])
        if torch.compiler.is_compiling():
            out, *hidden = mlp_forward_op(x, weights, biases, compute_dtype)
        else:
            out, hidden = mlp_forward(x, weights, biases, compute_dtype)
        ctx.save_for_backward(x, *weights, *biases, *hidden)
        ctx.compute_dtype = compute_dtype
        ctx.n_layers = len(weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from ..kernels.prompt_mlp import mlp_backward, mlp_backward_op

        n_layers = ctx.n_layers
        x, *rest = ctx.saved_tensors
        weights, biases, hidden = rest[:n_layers], rest[n_layers:2 * n_layers], rest[2 * n_layers:]
        need_x = ctx.needs_input_grad[0]
        need_w = [ctx.needs_input_grad[2 + 2 * i] for i in range(n_layers)]
        need_b = [ctx.needs_input_grad[3 + 2 * i] for i in range(n_layers)]
        if torch.compiler.is_compiling():
            grads = mlp_backward_op(grad_out, x, weights, biases, hidden, ctx.compute_dtype, need_x, need_w, need_b)
            grad_x = grads[0] if need_x else None
            grad_w = [g if need else None for g, need in zip(grads[1:1 + n_layers], need_w)]
            grad_b = [g if need and b is not None else None
                      for g, need, b in zip(grads[1 + n_layers:], need_b, biases)]
        else:
            grad_x, grad_w, grad_b = mlp_backward(grad_out, x, weights, biases, hidden, ctx.compute_dtype,
                                                  need_x, need_w, need_b)
        return (grad_x, None, *[g for pair in zip(grad_w, grad_b) for g in pair])


def compute_dtype_for(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: the autocast dtype when autocast is on, else the weight's."""
    device_type = x.device.type
    if _autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def prompt_mlp_triton(x: torch.Tensor, layers: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor]]]) -> torch.Tensor:
    """``Linear -> ReLU -> ... -> Linear`` over the last dim of ``x`` with the Triton kernels.

    ``x``: (..., D_in) fp32/bf16/fp16; ``layers``: (weight (out, in), bias (out,) or None) pairs.
    Returns (..., D_out) in the compute dtype (autocast's, else the parameters'), differentiable
    with respect to ``x`` and every weight and bias. Inputs are assumed validated.
    """
    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    compute_dtype = compute_dtype_for(x, layers[0][0])
    params = [t for weight, bias in layers for t in (weight, bias)]
    out = PromptMLPFunction.apply(x2d, compute_dtype, *params)
    return out.reshape(*lead_shape, out.shape[-1])

