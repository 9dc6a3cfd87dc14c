"""Test setup. Without CUDA the Triton kernels run in Triton's CPU interpreter, which must be
switched on before Triton is imported; GPU-only tests carry the `cuda` marker and are skipped."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests run in parallel workers on few cores: one intra-op thread each avoids oversubscription.
torch.set_num_threads(1)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
