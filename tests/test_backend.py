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


def test_use_backend_is_local_to_each_thread():
    """Two threads inside their own blocks at the same time each see their own backend; the
    process default (seen by a thread in no block) and the caller's choice are left as they were."""
    import threading

    default = ptuning_fast.get_backend()
    inside, after_exit = threading.Barrier(3), threading.Barrier(3)
    seen = {}

    def worker(name):
        with ptuning_fast.use_backend(name):
            inside.wait(timeout=10)  # both blocks are open now
            seen[name] = [ptuning_fast.get_backend() for _ in range(100)]
            after_exit.wait(timeout=10)
        seen[name + " after"] = ptuning_fast.get_backend()

    def outsider():
        inside.wait(timeout=10)
        seen["outsider"] = ptuning_fast.get_backend()
        after_exit.wait(timeout=10)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("reference", "triton")]
    threads.append(threading.Thread(target=outsider))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert seen["reference"] == ["reference"] * 100 and seen["triton"] == ["triton"] * 100
    assert seen["outsider"] == default
    assert seen["reference after"] == seen["triton after"] == default == ptuning_fast.get_backend()


def test_use_backend_is_local_to_each_asyncio_task():
    import asyncio

    default = ptuning_fast.get_backend()

    async def task(name, seen):
        with ptuning_fast.use_backend(name):
            for _ in range(5):
                await asyncio.sleep(0)  # the other task runs its block meanwhile
                seen.append(ptuning_fast.get_backend())
        seen.append(ptuning_fast.get_backend())

    async def main():
        a, b = [], []
        with ptuning_fast.use_backend("reference"):  # tasks started here inherit it as their default
            await asyncio.gather(task("triton", a), task("auto", b))
            assert ptuning_fast.get_backend() == "reference"
        return a, b

    a, b = asyncio.run(main())
    assert a == ["triton"] * 5 + ["reference"] and b == ["auto"] * 5 + ["reference"]
    assert ptuning_fast.get_backend() == default


def test_set_backend_inside_a_block_lasts_until_the_block_ends():
    default = ptuning_fast.get_backend()
    with ptuning_fast.use_backend("triton"):
        ptuning_fast.set_backend("reference")
        assert ptuning_fast.get_backend() == "reference"
    assert ptuning_fast.get_backend() == default
