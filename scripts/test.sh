#!/usr/bin/env bash
# The test command: installs what it needs, then runs the whole suite (CPU: Triton kernels under
# TRITON_INTERPRET=1; GPU tests run only where CUDA is available). Extra args go to pytest.
#
# Without extra args a second stage follows: the GPU machine runs Triton 3.6 while this suite
# installs the newest, so the Triton kernel tests (under 3.6's interpreter) and the
# ahead-of-time compile check (3.6's compiler) run again in .venv-triton36: the same torch, from
# the pip cache, with triton==3.6.0 and numpy<2.3 (3.6's interpreter fails on numpy 2.4). It
# reuses the C++ extension the first stage built in the source tree.
#
# A third stage runs the suite on the newest transformers release (scripts/constraints-newest.txt)
# in .venv-newest. There, the tests whose oracle is plain PEFT's prompt learning where PEFT 0.21.2
# fails on transformers >= 5.24 (tests/fixtures/peft_fails_on_newest.txt) are strict xfail with
# that reason (conftest.py), and tests/test_peft_reference.py checks those cases against PEFT's
# numbers recorded on the pinned versions.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
WORKERS="${PTUNING_FAST_TEST_WORKERS:-2}"
if [ $# -gt 0 ]; then
    exec "$PY" -m pytest -n "$WORKERS" -q "$@"
fi
status=0
"$PY" -m pytest -n "$WORKERS" -q || status=$?

echo "== second stage: Triton 3.6 (the GPU machine's version)"
TRITON36_TESTS=(tests/ops/test_prompt_mlp.py tests/ops/test_prefix_kv.py tests/ops/test_nonfinite_kernels.py tests/ops/test_triton_ops.py tests/p_tuning/test_encoder_kernels.py
                tests/prefix_tuning/test_cache.py tests/kernels)
(
    export PTUNING_FAST_VENV="$ROOT/.venv-triton36" PTUNING_FAST_EXTRAS=test PTUNING_FAST_NO_EXTENSION=1
    export PTUNING_FAST_PINS="triton==3.6.0 numpy<2.3"
    source "$ROOT/scripts/bootstrap.sh"
    "$PY" -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
    "$PY" -m pytest -n "$WORKERS" -q "${TRITON36_TESTS[@]}"
) || status=$?

echo "== third stage: the newest transformers release"
(
    export PTUNING_FAST_VENV="$ROOT/.venv-newest" PTUNING_FAST_EXTRAS=test,bench,demo PTUNING_FAST_NO_EXTENSION=1
    export PTUNING_FAST_CONSTRAINTS=scripts/constraints-newest.txt
    source "$ROOT/scripts/bootstrap.sh"
    "$PY" -c "import transformers; print('transformers', transformers.__version__)"
    # The compile checks do not depend on transformers: the first two stages ran them.
    "$PY" -m pytest -n "$WORKERS" -q tests --ignore=tests/kernels --ignore=tests/csrc
) || status=$?
exit "$status"
