"""Argument checks shared by the public entry points: clear errors that name the argument."""
from __future__ import annotations

import torch


def check_tensor(x, name: str, *, ndim=None, dtypes=None, device=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"`{name}` must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"`{name}` must have dtype in ({names}), got {x.dtype}")
    if device is not None and x.device != torch.device(device):
        raise ValueError(f"`{name}` is on {x.device} but must be on {device}")
    return x


def check_token_tensor(x, name: str, shape: tuple, *, of: str, hint: str = "", dtypes=None, device=None) -> None:
    """``x`` is a (B, S) tensor with one entry per token of the ``of`` (e.g. "input") of shape ``shape``."""
    check_tensor(x, name, ndim=2, dtypes=dtypes, device=device)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"`{name}` has shape {tuple(x.shape)} but {of} is {tuple(shape)}{hint}")


INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_index_range(indices: torch.Tensor, upper: int, name: str) -> None:
    """Raise ValueError if any index is outside [0, upper). One host sync on accelerators."""
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.stack(torch.aminmax(indices)).tolist()
    if lo < 0 or hi >= upper:
        raise ValueError(f"`{name}` holds indices outside [0, {upper}): min {lo}, max {hi}")


def check_positive_int(value, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__})")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def check_config_int(config, name: str, filled_from: str) -> int:
    """A config field that PEFT fills when it wraps a model: say so when it is still None."""
    value = getattr(config, name)
    if value is None:
        raise TypeError(f"`{name}` must be an int, got None: PEFT fills it from {filled_from} when wrapping "
                        "a model; set it when building the encoder directly")
    return check_positive_int(value, name)
