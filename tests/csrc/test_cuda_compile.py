"""The CUDA sources compile with nvcc, also on machines without a GPU, so they cannot rot unseen.

Each csrc/*.cu is compiled (``nvcc -c``, one architecture, sm_90) against the installed torch
headers with the flags setup.py uses. A CPU-only torch ships the CUDA headers but not the one
generated at torch's build time (c10/cuda/impl/cuda_cmake_macros.h); the test supplies it.
Skipped only when nvcc is absent.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))


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


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    command = [
        nvcc, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")),
        "-O3", "-std=c++17", "-DWITH_CUDA", "-gencode=arch=compute_90,code=sm_90",
        *COMMON_NVCC_FLAGS,
        *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
        *generated_header_stub(tmp_path / "stub"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def test_cuda_sources_are_found():
    """Guards the parametrization above against silently checking nothing."""
    assert "prompt_mask_cuda.cu" in [p.name for p in CUDA_SOURCES]
