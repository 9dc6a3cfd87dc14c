"""The CUDA sources compile with nvcc, also on machines without a GPU, so they cannot rot unseen,
and every kernel in them fits the chips it is built for.

Each csrc/*.cu is compiled once (``nvcc -c``) for sm_80 (A100) and sm_90 (H100 / H200) against the
installed torch headers with the flags setup.py uses, with ptxas reporting each kernel's
resources (``-Xptxas -v``). Per kernel and chip: no spill stores or loads, a stack frame no larger
than the one 16-byte output chunk the mask kernel assembles (its ``vals`` array; no other local
memory), at most 255 registers per thread and registers x threads within the SM's 64K, shared
memory within the block's limit. A CPU-only torch ships the CUDA headers but not the one generated
at torch's build time (c10/cuda/impl/cuda_cmake_macros.h); the test supplies it. Skipped only when
nvcc is absent.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))
# Compute capability -> shared memory one block may use (bytes); as ptuning_fast.kernels._common.CHIPS.
CHIPS = {80: 166912, 90: 232448}
MAX_REGISTERS, REGISTERS_PER_SM = 255, 65536
STACK_ALLOWED = 16  # bytes: the mask kernel's 16-byte output chunk (kChunkBytes), built in place


def find_nvcc():
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


def generated_header_stub(directory: Path) -> list[str]:
    """Include flag for the build-time header a CPU-only torch lacks (empty if torch has it)."""
    from torch.utils.cpp_extension import include_paths

    name = Path("c10/cuda/impl/cuda_cmake_macros.h")
    if any((Path(p) / name).exists() for p in include_paths()):
        return []
    (directory / name).parent.mkdir(parents=True)
    (directory / name).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [f"-I{directory}"]


def block_threads(source: Path) -> int:
    """Threads per block of the source's launches: its ``kThreads`` (every kernel launches that)."""
    found = re.findall(r"constexpr int kThreads = (\d+);", source.read_text())
    assert len(found) == 1, f"{source.name}: expected one `constexpr int kThreads = N;`"
    return int(found[0])


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def kernel_resources(ptxas_report: str) -> list[dict]:
    """Per (kernel, chip): registers, stack frame, spill bytes and shared memory, from ptxas -v."""
    kernels, current = [], None
    for line in ptxas_report.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": m.group(1), "chip": int(m.group(2))}
            kernels.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _USED.search(line)):
            current.update(registers=int(m.group(1)), shared=int(m.group(2) or 0))
    return kernels


def demangle(name: str) -> str:
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name


def limit_violations(kernel: dict, threads: int) -> list[str]:
    found = []
    if kernel["spill_stores"] or kernel["spill_loads"]:
        found.append(f"spills {kernel['spill_stores']} B stores / {kernel['spill_loads']} B loads")
    if kernel["stack"] > STACK_ALLOWED:
        found.append(f"{kernel['stack']} B stack frame > {STACK_ALLOWED} B")
    if kernel["registers"] > MAX_REGISTERS:
        found.append(f"{kernel['registers']} registers > {MAX_REGISTERS}")
    if kernel["registers"] * threads > REGISTERS_PER_SM:
        found.append(f"{kernel['registers']} registers x {threads} threads > {REGISTERS_PER_SM}")
    if kernel["shared"] > CHIPS[kernel["chip"]]:
        found.append(f"{kernel['shared']} B shared > {CHIPS[kernel['chip']]} B")
    return found


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_and_fits(source, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    command = [
        nvcc, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")),
        "-O3", "-std=c++17", "-DWITH_CUDA", *[f"-gencode=arch=compute_{c},code=sm_{c}" for c in CHIPS],
        "-Xptxas", "-v",
        *COMMON_NVCC_FLAGS,
        *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
        *generated_header_stub(tmp_path / "stub"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"

    kernels = kernel_resources(result.stdout + result.stderr)
    assert {k["chip"] for k in kernels} == set(CHIPS), f"ptxas reported no kernels for some chip:\n{result.stderr[-3000:]}"
    assert all("registers" in k and "stack" in k for k in kernels), kernels
    threads = block_threads(source)
    failures = [f"sm_{k['chip']} {demangle(k['kernel'])}: {'; '.join(v)}"
                for k in kernels if (v := limit_violations(k, threads))]
    assert not failures, "\n".join(failures)


def test_ptxas_report_parsing():
    """The parser reads what ptxas prints (CUDA 12-13), and the limits catch each excess."""
    report = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    24 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 32 bytes smem, 400 bytes cmem[0]"""
    (kernel,) = kernel_resources(report)
    assert kernel == {"kernel": "_Z1kv", "chip": 90, "stack": 24, "spill_stores": 8, "spill_loads": 8,
                      "registers": 40, "shared": 32}
    assert len(limit_violations(kernel, 256)) == 2  # spills, stack
    assert limit_violations({**kernel, "stack": 16, "spill_stores": 0, "spill_loads": 0}, 256) == []
    assert limit_violations({**kernel, "stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 255}, 512) \
        == ["255 registers x 512 threads > 65536"]


def test_cuda_sources_are_found():
    """Guards the parametrization above against silently checking nothing."""
    assert "prompt_mask_cuda.cu" in [p.name for p in CUDA_SOURCES]
