"""Loads the compiled C++/CUDA extension ``ptuning_fast._C``.

Order: the module built by ``setup.py`` -> a JIT build of ``csrc/`` with
``torch.utils.cpp_extension.load`` (cached under ``$PTUNING_FAST_CACHE`` or
``~/.cache/ptuning_fast``) -> ``None`` with one warning, in which case every caller uses the
PyTorch reference path. Importing ptuning_fast never fails because of the extension.
Set ``PTUNING_FAST_NO_JIT=1`` to skip the JIT build.
"""
from __future__ import annotations

import functools
import glob
import os
import warnings
from pathlib import Path

import torch

_PKG = Path(__file__).resolve().parent


def _source_dir() -> Path | None:
    for candidate in (_PKG.parent / "csrc", _PKG / "_csrc"):  # source checkout, then wheel copy
        if candidate.is_dir() and glob.glob(str(candidate / "*.cpp")):
            return candidate
    return None


def _jit_build():
    from torch.utils.cpp_extension import CUDA_HOME, load

    src = _source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/) are not shipped with this install")
    sources = sorted(glob.glob(str(src / "*.cpp")))
    cuda_sources = sorted(glob.glob(str(src / "*.cu")))
    with_cuda = torch.cuda.is_available() and CUDA_HOME is not None and bool(cuda_sources)
    build_dir = Path(os.environ.get("PTUNING_FAST_CACHE", Path.home() / ".cache" / "ptuning_fast"))
    build_dir = build_dir / f"torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name="ptuning_fast_C",
        sources=sources + (cuda_sources if with_cuda else []),
        extra_cflags=["-O3"] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3", "-DWITH_CUDA"],
        build_directory=str(build_dir),
        verbose=False,
    )


@functools.lru_cache(maxsize=None)
def load_extension():
    """The extension module, or None (with a warning) when it cannot be built or loaded."""
    try:
        from ptuning_fast import _C  # built by setup.py

        return _C
    except ImportError as exc:
        first_error = exc
    if os.environ.get("PTUNING_FAST_NO_JIT", "0") == "1":
        reason = f"{first_error}; JIT build disabled by PTUNING_FAST_NO_JIT=1"
    else:
        try:
            return _jit_build()
        except Exception as exc:  # no compiler, no headers, build error: fall back, never crash
            reason = f"{first_error}; JIT build failed: {type(exc).__name__}: {exc}"
    warnings.warn(
        "ptuning_fast: the C++/CUDA extension is unavailable, using the PyTorch reference path "
        f"instead ({reason}). Reinstall with `pip install --no-build-isolation -e .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def extension_available() -> bool:
    return load_extension() is not None


def extension_has_cuda() -> bool:
    ext = load_extension()
    return ext is not None and bool(ext.with_cuda())


def require_extension():
    """The extension, or a RuntimeError that says how to get it."""
    ext = load_extension()
    if ext is None:
        raise RuntimeError("the ptuning_fast C++ extension is not available (see the earlier warning); "
                           "install with `pip install --no-build-isolation -e .` and a C++ compiler")
    return ext
