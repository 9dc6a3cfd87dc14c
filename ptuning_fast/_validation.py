"""Argument checks shared by the public entry points: clear errors that name the argument."""
from __future__ import annotations

import contextlib
import contextvars
import os

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


# --------------------------------------------------------------------------------------------
# Checks that read tensor values
# --------------------------------------------------------------------------------------------
# Reading a value of an accelerator tensor (``.item()``, ``.tolist()``, ``bool(t)``...) stalls the
# host until the device catches up and makes the step impossible to capture as a CUDA graph. So
# the checks that read values (index ranges, padding side, indices in order) run only where the
# read is free, chosen by the mode:
#   "auto" (default): on CPU tensors, never on accelerator tensors;
#   "always": on every tensor (debugging: one host sync per check on an accelerator);
#   "never": on no tensor (what an accelerator run does, on any device: lets a CPU test see it).
# Never while compiling or capturing a CUDA graph. Set with ``PTUNING_FAST_VALUE_CHECKS`` (read
# at import) or, for a block of code, ``with ptuning_fast.value_checks("always"): ...``.
VALUE_CHECK_MODES = ("auto", "always", "never")
VALUE_CHECKS_ENV_VAR = "PTUNING_FAST_VALUE_CHECKS"


def _check_mode(mode, argument: str) -> str:
    if mode not in VALUE_CHECK_MODES:
        raise ValueError(f"`{argument}` must be one of {VALUE_CHECK_MODES}, got {mode!r}")
    return mode


_DEFAULT_VALUE_CHECKS = _check_mode(os.environ.get(VALUE_CHECKS_ENV_VAR, "auto").strip().lower(),
                                    VALUE_CHECKS_ENV_VAR)
_value_checks = contextvars.ContextVar("ptuning_fast_value_checks", default=None)


def value_checks_mode() -> str:
    """The mode of the checks that read tensor values now: ``"auto"``, ``"always"`` or ``"never"``."""
    mode = _value_checks.get()
    return _DEFAULT_VALUE_CHECKS if mode is None else mode


@contextlib.contextmanager
def value_checks(mode: str = "always"):
    """Run the block with the value checks in ``mode`` (see :func:`reads_values`), then restore."""
    token = _value_checks.set(_check_mode(mode, "mode"))
    try:
        yield
    finally:
        _value_checks.reset(token)


def reads_values(tensor: torch.Tensor) -> bool:
    """Whether a check may read ``tensor``'s values now: on CPU tensors in mode ``"auto"``, on every
    tensor in ``"always"``, on none in ``"never"``; never while compiling or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    mode = value_checks_mode()
    if mode == "never":
        return False
    if tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return mode == "always" or tensor.device.type == "cpu"


def check_index_range(indices: torch.Tensor, upper: int, name: str) -> None:
    """Raise ValueError if any index is outside [0, upper): where values are read
    (:func:`reads_values`; on an accelerator only with ``value_checks("always")``: one host sync)."""
    if indices.numel() == 0 or not reads_values(indices):
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
