"""Builds ptuning_fast and its C++/CUDA extension `ptuning_fast._C`.

- CUDA torch + nvcc present   -> CUDAExtension over csrc/*.cpp + csrc/*.cu (WITH_CUDA defined)
- CPU torch (or no nvcc)      -> CppExtension over csrc/*.cpp
- no torch at build time      -> pure-Python install; the extension is compiled on first use
- PTUNING_FAST_NO_EXTENSION=1 -> pure-Python install (reference path or JIT at run time)

Ninja is used by torch's BuildExtension. The csrc/ sources are also copied into the package
(ptuning_fast/_csrc) so that the JIT fallback works from a wheel.
"""
import glob
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package so the JIT fallback can find it after a wheel install."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "ptuning_fast", "_csrc")
        if os.path.isdir(os.path.join(ROOT, "csrc")):
            shutil.copytree(os.path.join(ROOT, "csrc"), target, dirs_exist_ok=True)


def extension_build():
    if os.environ.get("PTUNING_FAST_NO_EXTENSION", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("ptuning_fast: torch is not importable at build time; installing without the compiled "
              "extension (it is compiled on first use). Use `pip install --no-build-isolation .`.")
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    want_cuda = os.environ.get("PTUNING_FAST_FORCE_CUDA", "") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    cxx_flags = ["-O3"]  # the C++ standard is the one torch builds its own extensions with
    if want_cuda and cu:
        ext = CUDAExtension(
            "ptuning_fast._C",
            cpp + cu,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        )
    else:
        ext = CppExtension("ptuning_fast._C", cpp, extra_compile_args=cxx_flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
