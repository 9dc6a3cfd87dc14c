"""Counting what a step costs a GPU, on a CPU: the host's reads of device data and the device
operations it launches.

- :class:`HostReads` records every read of tensor data by the host (``Tensor.item``, ``tolist``,
  ``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``cpu``, ``numpy``, ``nonzero``,
  ``torch.equal``; and, at the dispatcher, the ops whose output shape or value the host must wait
  for: ``aten._local_scalar_dense``, ``nonzero``, ``masked_select``, ``unique``, ``equal``...), and
  every Python list made into a tensor (``torch.tensor`` / ``torch.as_tensor``: a host-to-device
  copy on an accelerator). Each record names the innermost frame outside torch, so a read is the
  package's own when that frame is in ``ptuning_fast/`` (a read inside transformers' code that
  the package called is transformers').
- :class:`LaunchCounter` counts the device operations one step would launch (the counting rule is
  in benchmarks/README.md): every aten op that reaches a device kernel counts 1; view-only and
  allocation-only ops count 0; each Triton kernel counts 1 where its launcher is called.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ptuning_fast

PACKAGE_DIR = os.path.dirname(os.path.abspath(ptuning_fast.__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)


class Read(NamedTuple):
    what: str
    filename: str
    lineno: int
    function: str

    @property
    def own(self) -> bool:
        """Made by the package's own code."""
        return self.filename.startswith(PACKAGE_DIR)

    def __str__(self) -> str:
        return f"{self.what} at {self.filename}:{self.lineno} ({self.function})"


def _caller() -> tuple:
    """(filename, lineno, function) of the innermost frame outside torch and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_TORCH_DIR) and filename != _THIS_FILE:
            return filename, frame.f_lineno, frame.f_code.co_name
        frame = frame.f_back
    return "?", 0, "?"


# Tensor methods that hand tensor data to the host (a device->host copy and a wait on a GPU).
TENSOR_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")
TORCH_READS = ("equal", "nonzero")
TORCH_FROM_LISTS = ("tensor", "as_tensor")
# aten ops whose result the host must wait for (a value, or an output shape that depends on data).
ATEN_READS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "equal", "is_nonzero",
              "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "allclose"}


class _ReadOps(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name in ATEN_READS:
            self.record(f"aten.{name}")
        return func(*args, **(kwargs or {}))


class HostReads:
    """``with HostReads() as reads: ...``; then ``reads.reads`` (every :class:`Read`) and
    ``reads.own()`` (those of the package's own code)."""

    def __init__(self):
        self.reads: list = []
        self._saved: list = []

    def _record(self, what: str) -> None:
        self.reads.append(Read(what, *_caller()))

    def _wrap(self, owner, name: str, what: str, only_lists: bool = False):
        original = owner.__dict__.get(name, None) if isinstance(owner, type) else getattr(owner, name)
        current = getattr(owner, name)
        record = self._record

        def wrapper(*args, **kwargs):
            if not only_lists or (args and isinstance(args[0], (list, tuple))):
                record(what)
            return current(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def __enter__(self):
        for name in TENSOR_READS:
            self._wrap(torch.Tensor, name, f"Tensor.{name}")
        for name in TORCH_READS:
            self._wrap(torch, name, f"torch.{name}")
        for name in TORCH_FROM_LISTS:
            self._wrap(torch, name, f"torch.{name}(list)", only_lists=True)
        self._mode = _ReadOps(self._record)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for owner, name, original in reversed(self._saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._saved.clear()
        return False

    def own(self) -> list:
        return [r for r in self.reads if r.own]


# --------------------------------------------------------------------------------------------
# Launches
# --------------------------------------------------------------------------------------------
# Ops that only make a tensor (no kernel) or only change metadata (a view) launch nothing.
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "_to_copy_noop", "set_", "resize_", "_reshape_alias", "view", "_unsafe_view",
              "reshape", "expand", "as_strided", "t", "transpose", "permute", "slice", "select", "unsqueeze",
              "squeeze", "narrow", "split", "split_with_sizes", "unbind", "chunk", "diagonal", "unfold",
              "view_as_real", "view_as_complex", "_conj", "_neg_view", "alias_copy", "lift", "clone_noop",
              "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
              "record_stream"}


def launches_of(func, args, kwargs) -> int:
    """Device operations that one aten call launches under the counting rule (0 or 1)."""
    name = func._overloadpacket.__name__
    if name in _NO_KERNEL or func.is_view or name == "_local_scalar_dense":
        return 0
    if name == "_to_copy":  # a cast or copy to the same dtype and device is free
        source = args[0]
        dtype = kwargs.get("dtype") or source.dtype
        device = kwargs.get("device") or source.device
        if dtype == source.dtype and torch.device(device) == source.device:
            return 0
    return 1


# The package's C++ builders that read a mask of any dtype in their kernel (no `mask != 0` first).
READS_ANY_MASK = {"packed_prompt_layout"}


class LaunchCounter(TorchDispatchMode):
    """Counts the device operations of the code run inside it (see :func:`launches_of`), per op
    in ``by_op``. A custom op of the package (a C++ builder: one CUDA kernel) counts 1, and 1 more
    for the ``mask != 0`` it runs on a mask that is not bool (:data:`READS_ANY_MASK` read every
    mask dtype in their kernel); a Triton kernel counts 1 at its launcher, which launches nothing
    while counting (see :func:`as_on_cuda`)."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "ptuning_fast":  # a C++ builder: its kernel, and `mask != 0` for a non-bool mask
            name = func._overloadpacket.__name__
            self.by_op[f"ptuning_fast.{name}"] += 1
            if args[0].dtype != torch.bool and name not in READS_ANY_MASK:
                self.by_op["aten.ne"] += 1
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        produced = any(isinstance(t, torch.Tensor) for t in (result if isinstance(result, (list, tuple)) else [result]))
        n = launches_of(func, args, kwargs) if produced else 0  # an op that returns no tensor runs no kernel
        if n:
            self.by_op[f"aten.{func._overloadpacket.__name__}"] += n
        return result

    def add(self, name: str) -> None:
        self.by_op[name] += 1

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


@contextlib.contextmanager
def as_on_cuda(counter: LaunchCounter):
    """The package's CUDA code path on CPU or meta tensors, for counting: the Triton kernels are
    chosen as on CUDA, and each launch is counted in ``counter`` at its launcher instead of run
    (their outputs hold no meaningful values); checks that read values are off, as on CUDA. The
    prompt-MLP launchers take their heuristic's pick for sm_90 (an H100), which decides how many
    kernels a launch is (exact fp32's fused backward splits its loop: a second, summing kernel)."""
    import importlib

    from ptuning_fast.kernels._common import CHIPS, KernelCall

    prefix_kv = importlib.import_module("ptuning_fast.ops.prefix_kv")  # the modules, not the functions
    prompt_mlp = importlib.import_module("ptuning_fast.ops.prompt_mlp")
    mlp_kernels = importlib.import_module("ptuning_fast.kernels.prompt_mlp")

    def count(call):
        counter.add(f"triton.{getattr(call.kernel, '__name__', None) or call.kernel.fn.__name__}")

    saved = [(prompt_mlp, "resolve_backend"), (prefix_kv, "resolve_backend"), (KernelCall, "launch"),
             (mlp_kernels, "_config")]
    originals = [getattr(owner, name) for owner, name in saved]
    prompt_mlp.resolve_backend = prefix_kv.resolve_backend = lambda device: "triton"
    KernelCall.launch = count
    mlp_kernels._config = lambda kind, key, call, configs, operand: configs(CHIPS[90])[0]
    try:
        with ptuning_fast.value_checks("never"):
            yield counter
    finally:
        for (owner, name), original in zip(saved, originals):
            setattr(owner, name, original)


__all__ = ["ATEN_READS", "READS_ANY_MASK", "HostReads", "LaunchCounter", "Read", "as_on_cuda", "launches_of"]
