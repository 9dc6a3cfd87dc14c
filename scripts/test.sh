#!/usr/bin/env bash
# The test command: installs what it needs, then runs the whole suite (CPU: Triton kernels under
# TRITON_INTERPRET=1; GPU tests run only where CUDA is available). Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "$PY" -m pytest -n "${PTUNING_FAST_TEST_WORKERS:-2}" -q "$@"
