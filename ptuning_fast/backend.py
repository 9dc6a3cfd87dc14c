"""The one switch that chooses how ptuning_fast computes: ``auto``, ``reference`` or ``triton``.

- ``reference``: the pure PyTorch path in :mod:`ptuning_fast.reference` (any device).
- ``triton``: the Triton kernels in :mod:`ptuning_fast.kernels`. CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` is set before Triton is imported (how the tests run the kernels on CPU).
- ``auto`` (default): Triton for CUDA tensors when Triton is importable, the reference elsewhere.

Choose it with the environment variable ``PTUNING_FAST_BACKEND`` (read at import), with
:func:`set_backend`, or for a block of code with ``with use_backend("reference"): ...``. The
block's choice is a context variable: it holds in that thread or asyncio task only (and in the
tasks it starts); other threads and tasks keep the process default.
The C++/CUDA mask builder follows the same switch (``reference`` forces the PyTorch mask).
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "PTUNING_FAST_BACKEND"


def _check_name(name, argument: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"`{argument}` must be a str, one of {BACKENDS}; got {type(name).__name__}")
    key = name.strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"`{argument}` must be one of {BACKENDS}; got {name!r}")
    return key


_default_backend = _check_name(os.environ.get(ENV_VAR, "auto"), ENV_VAR)  # the process default
# The choice of the innermost ``use_backend`` block running in this thread / task (None: none).
_block_backend: contextvars.ContextVar = contextvars.ContextVar("ptuning_fast_backend", default=None)


# Dynamo cannot trace ContextVar.get: under torch.compile the choice is read once, when a function
# is compiled, and the compiled code keeps it (the choice is a compile-time constant there).
@torch.compiler.assume_constant_result
def get_backend() -> str:
    """The backend chosen now: ``"auto"``, ``"reference"`` or ``"triton"``."""
    chosen = _block_backend.get()
    return _default_backend if chosen is None else chosen


def set_backend(backend: str) -> None:
    """Choose the backend for all later calls (see the module docstring). Inside a
    :func:`use_backend` block it changes that block's choice only, as the block restores the
    previous choice when it ends."""
    global _default_backend
    key = _check_name(backend, "backend")
    if _block_backend.get() is None:
        _default_backend = key
    else:
        _block_backend.set(key)


@contextlib.contextmanager
def use_backend(backend: str):
    """Context manager: run the block with ``backend`` in this thread or asyncio task, then
    restore the previous choice. Other threads and tasks are not affected."""
    token = _block_backend.set(_check_name(backend, "backend"))
    try:
        yield
    finally:
        _block_backend.reset(token)


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


_TRITON_AVAILABLE = None  # checked on first use, a plain flag so that torch.compile can trace it


def triton_available() -> bool:
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        _TRITON_AVAILABLE = _import_triton()
    return _TRITON_AVAILABLE


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device) -> str:
    """The concrete backend (``"reference"`` or ``"triton"``) for tensors on ``device``."""
    backend = get_backend()
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    # Explicit "triton": say clearly why it cannot run rather than failing inside Triton.
    if not triton_available():
        raise RuntimeError("backend 'triton' was chosen but Triton is not importable; "
                           "install triton or choose backend 'auto' / 'reference'")
    if device.type != "cuda" and not triton_interpreter_enabled():
        raise RuntimeError(f"backend 'triton' needs CUDA tensors (got device {device}); on CPU set "
                           "TRITON_INTERPRET=1 before importing ptuning_fast to run the kernels "
                           "in Triton's interpreter")
    return "triton"
