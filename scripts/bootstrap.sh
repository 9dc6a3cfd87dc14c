#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and installs ptuning_fast into it, with what the
# tests, benchmarks and demo need. Sourced by scripts/demo.sh and scripts/test.sh.
#
# Set PTUNING_FAST_VENV to reuse another environment (e.g. one that already has CUDA torch).
# torch: an importable torch is kept as it is (never a second one over it). Without one, a
# machine with an NVIDIA GPU gets `torch` from the index; a CPU-only machine gets
# $PTUNING_FAST_TORCH_SPEC (default torch==2.13.0, the CPU build available here).
# PTUNING_FAST_EXTRAS: the package's extras to install (default test,bench,demo);
# PTUNING_FAST_PINS: more requirement specs installed with it (e.g. "triton==3.6.0 numpy<2.3");
# PTUNING_FAST_CONSTRAINTS: the constraints file (default scripts/constraints.txt, the pinned versions).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PTUNING_FAST_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() {  # pip install -q, without the noise of unreachable extra index locations
    "$PY" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; }
}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip_install torch
    else
        pip_install "${PTUNING_FAST_TORCH_SPEC:-torch==2.13.0}"
    fi
fi
# Reinstall only when the packaging or C++/CUDA sources changed (a stamp of their hash).
STAMP="$VENV/.ptuning_fast_stamp"
EXTRAS="${PTUNING_FAST_EXTRAS:-test,bench,demo}"
read -r -a PINS <<<"${PTUNING_FAST_PINS:-}"
CONSTRAINTS="${PTUNING_FAST_CONSTRAINTS:-scripts/constraints.txt}"
HASH="$( (cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/$CONSTRAINTS" "$ROOT"/csrc/* 2>/dev/null
          echo "$EXTRAS ${PINS[*]} ${PTUNING_FAST_NO_EXTENSION:-}") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$HASH" ] || ! "$PY" -c "import ptuning_fast" >/dev/null 2>&1; then
    # --no-build-isolation: build the extension against the torch above instead of a fresh one;
    # -c: the dependency versions the suite is checked against.
    pip_install setuptools wheel
    (cd "$ROOT" && pip_install --no-build-isolation -c "$CONSTRAINTS" -e ".[$EXTRAS]" ${PINS[@]+"${PINS[@]}"})
    echo "$HASH" > "$STAMP"
fi
