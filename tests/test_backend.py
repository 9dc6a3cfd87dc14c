"""The one backend switch and the extension loader."""
import pytest
import torch

import ptuning_fast
from ptuning_fast import backend
from ptuning_fast._extension import load_extension


def test_set_get_and_context_manager_restore():
    assert ptuning_fast.get_backend() in backend.BACKENDS
    previous = ptuning_fast.get_backend()
    with ptuning_fast.use_backend("reference"):
        assert ptuning_fast.get_backend() == "reference"
        assert backend.resolve_backend(torch.device("cpu")) == "reference"
    assert ptuning_fast.get_backend() == previous
    ptuning_fast.set_backend("AUTO")
    assert ptuning_fast.get_backend() == "auto"
    assert backend.resolve_backend(torch.device("cpu")) == "reference"  # auto: reference off CUDA
    ptuning_fast.set_backend(previous)


def test_unknown_backend_errors():
    with pytest.raises(ValueError, match="`backend` must be one of"):
        ptuning_fast.set_backend("cuda")
    with pytest.raises(TypeError, match="`backend` must be a str"):
        ptuning_fast.set_backend(None)


def test_explicit_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ptuning_fast.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            backend.resolve_backend(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ptuning_fast.use_backend("triton"):
        assert backend.resolve_backend(torch.device("cpu")) == "triton"


def test_extension_loads_on_cpu():
    ext = load_extension()
    assert ext is not None, "the C++ extension should build on a machine with a compiler"
    assert ext.with_cuda() is (torch.version.cuda is not None and torch.cuda.is_available()) or not ext.with_cuda()
