#!/usr/bin/env bash
# The GPU check: the one command to run on a GPU machine (README, "GPU check").
#
#   bash scripts/gpu_check.sh OUTDIR            run it (needs an NVIDIA GPU; no network)
#   bash scripts/gpu_check.sh --dry-run OUTDIR  print the plan and which tools are missing; exit 0
#
# Expects torch (CUDA), Triton, transformers, PEFT, pytest (+ xdist), pybind11 and ninja already
# installed for $PYTHON (default python3), and nvcc / compute-sanitizer from the CUDA toolkit.
# Stages, each under `timeout`, so that one slow stage cannot eat the others' time: a stage runs
# for at most its cap, and never into the minimum the stages after it are kept (the whole run
# stays under GPU_CHECK_TOTAL_S, default 470 s). The caps are first guesses: no stage has been
# timed on a GPU yet (stages.json records each one's seconds when it runs).
#   env        nvidia-smi, versions, commit, command                                   -> env.txt
#   build      pip install --no-build-isolation --no-deps -e . with the extension built for
#              this GPU's arch (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability())
#                                                                         (log appended to env.txt)
#   tests      the whole suite with the GPU tests, pytest -n 8, less the two ahead-of-time compile
#              checks (CPU only, run in CI with this Triton version)                  -> tests.txt
#   memcheck   compute-sanitizer --tool memcheck on the mask and layout builders' CUDA tests -> sanitizer.txt
#   racecheck  compute-sanitizer --tool racecheck on the same                         -> sanitizer.txt
#   bench      python -m benchmarks --tag gpu --out OUTDIR (the components with speed targets
#              first; the JSON is rewritten after each component, so a stage cut short by its
#              limit keeps what it measured)   -> gpu.json, gpu_speedup.png, gpu_floor.png
#   summary    each component's ratio to PEFT eager, torch.compile and its floor, by target
#                                                                                    -> summary.md
# plus stages.json (each stage's status, exit code, seconds, limit): at most 8 plain files in
# OUTDIR, no subfolders. The exit status is 0 when every stage passed, else 1.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/scripts/gpu_check.sh"
CALLER_DIR="$PWD"
cd "$ROOT"

MODE=run
case "${1:-}" in
    --dry-run) MODE=dry-run; shift ;;
    --stage) MODE="stage_${2:-}"; shift 2 ;;  # internal: one stage, under the parent's timeout
esac
if [ $# -ne 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash scripts/gpu_check.sh [--dry-run] OUTDIR" >&2
    exit 2
fi
case "$1" in
    /*) OUT="$1" ;;
    *) OUT="$CALLER_DIR/$1" ;;
esac
PY="${PYTHON:-python3}"
TOTAL="${GPU_CHECK_TOTAL_S:-470}"
TAG=gpu
# name, cap seconds, seconds kept for it while earlier stages run
STAGES=(
    "env 20 5"
    "build 180 60"
    "tests 240 60"
    "memcheck 90 20"
    "racecheck 60 15"
    "bench 240 60"
    "summary 20 5"
)
TEST_ARGS=(-q -n 8 -p no:cacheprovider -rfEs
           # CPU-only checks, run in CI with this Triton version too: here the minutes go to the GPU.
           --deselect tests/kernels/test_gpu_compile.py::test_every_launch_variant_compiles_and_fits
           --deselect tests/csrc/test_cuda_compile.py::test_cuda_source_compiles_and_fits)
SANITIZED_TESTS=(-q -p no:xdist -p no:cacheprovider tests/ops/test_mask.py tests/ops/test_packed_layout.py
                 -k "cuda and not sanitizer")

find_sanitizer() {
    command -v compute-sanitizer 2>/dev/null \
        || { [ -x /usr/local/cuda/bin/compute-sanitizer ] && echo /usr/local/cuda/bin/compute-sanitizer; }
}
find_nvcc() {
    command -v nvcc 2>/dev/null || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; }
}

# --------------------------------------------------------------------------------------------
# The stages (each runs as `bash scripts/gpu_check.sh --stage NAME OUTDIR` under timeout)
# --------------------------------------------------------------------------------------------
stage_env() {
    {
        echo "command: bash scripts/gpu_check.sh $OUT"
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit: $(git rev-parse HEAD 2>/dev/null) (dirty: $([ -n "$(git status --porcelain 2>/dev/null)" ] && echo yes || echo no))"
        echo "--- nvidia-smi"
        nvidia-smi
        echo "--- nvcc"
        "$(find_nvcc)" --version
        echo "--- python packages"
        "$PY" - <<'PYTHON'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "peft", "numpy", "pytest", "xdist", "pybind11", "ninja"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "missing:", exc)
import torch
print("cuda", torch.version.cuda, "| device", torch.cuda.get_device_name(0), "| capability",
      torch.cuda.get_device_capability(0))
PYTHON
    } >"$OUT/env.txt" 2>&1
}

stage_build() {
    {
        echo "--- build"
        local arch
        arch="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")" || return 1
        echo "TORCH_CUDA_ARCH_LIST=$arch"
        TORCH_CUDA_ARCH_LIST="$arch" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
        "$PY" -c "
from ptuning_fast._extension import load_extension
ext = load_extension()
assert ext is not None and ext.with_cuda(), 'the extension was not built with CUDA'
print('extension built with CUDA:', ext.__file__)"
    } >>"$OUT/env.txt" 2>&1
}

stage_tests() {
    "$PY" -m pytest "${TEST_ARGS[@]}" >"$OUT/tests.txt" 2>&1
}

sanitize() {
    local sanitizer
    sanitizer="$(find_sanitizer)" || { echo "compute-sanitizer not found" >>"$OUT/sanitizer.txt"; return 1; }
    echo "--- compute-sanitizer --tool $1" >>"$OUT/sanitizer.txt"
    "$sanitizer" --tool "$1" --error-exitcode 3 "$PY" -m pytest "${SANITIZED_TESTS[@]}" >>"$OUT/sanitizer.txt" 2>&1
}
stage_memcheck() { sanitize memcheck; }
stage_racecheck() { sanitize racecheck; }

stage_bench() {  # writes gpu.json (after every component) and, at the end, the two plots
    local rc=0
    "$PY" -m benchmarks --tag "$TAG" --out "$OUT" || rc=$?
    [ "$rc" -ne 0 ] && echo "python -m benchmarks exited with $rc (recorded in stages.json)"
    return "$rc"
}

stage_summary() {
    "$PY" scripts/gpu_summary.py "$OUT/$TAG.json" --stages "$OUT/stages.json" >"$OUT/summary.md"
}

if [ "${MODE#stage_}" != "$MODE" ]; then
    declare -F "$MODE" >/dev/null || { echo "unknown stage ${MODE#stage_}" >&2; exit 2; }
    "$MODE"
    exit $?
fi

# --------------------------------------------------------------------------------------------
# Dry run: the plan, and which tools are found
# --------------------------------------------------------------------------------------------
if [ "$MODE" = dry-run ]; then
    echo "GPU check plan (dry run): results into $OUT (at most 8 files), within ${TOTAL} s"
    for stage in "${STAGES[@]}"; do
        read -r name cap floor <<<"$stage"
        printf '  stage %-10s up to %4s s (keeps %3s s)\n' "$name" "$cap" "$floor"
    done
    echo "  tests:     $PY -m pytest ${TEST_ARGS[*]}"
    echo "  sanitizer: compute-sanitizer --tool memcheck|racecheck $PY -m pytest ${SANITIZED_TESTS[*]}"
    echo "  bench:     $PY -m benchmarks --tag $TAG --out $OUT"
    echo "  summary:   $PY scripts/gpu_summary.py $OUT/$TAG.json --stages $OUT/stages.json"
    missing=()
    check() {  # name, then the command that finds it
        local name="$1" found
        shift
        if found="$("$@" 2>/dev/null)" && [ -n "$found" ]; then
            printf '  found    %-18s %s\n' "$name" "$(echo "$found" | head -n 1)"
        else
            printf '  MISSING  %s\n' "$name"
            missing+=("$name")
        fi
    }
    echo "tools:"
    check python command -v "$PY"
    check pip "$PY" -m pip --version
    check pytest "$PY" -m pytest --version
    check pytest-xdist "$PY" -c "import xdist; print('xdist', xdist.__version__)"
    check torch "$PY" -c "import torch; print('torch', torch.__version__)"
    check triton "$PY" -c "import triton; print('triton', triton.__version__)"
    check pybind11 "$PY" -c "import pybind11; print('pybind11', pybind11.__version__)"
    check ninja command -v ninja
    check nvidia-smi command -v nvidia-smi
    check nvcc find_nvcc
    check compute-sanitizer find_sanitizer
    check timeout command -v timeout
    check git command -v git
    if [ ${#missing[@]} -eq 0 ]; then
        echo "every tool is found"
    else
        echo "missing: ${missing[*]} (a real run records the stages that need them as failed)"
    fi
    exit 0
fi

# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
mkdir -p "$OUT"
START=$(date +%s)
RESULTS=()
FAILED=0

# Seconds stage INDEX may take: its cap, less what the later stages keep, within the total.
limit_for() {
    local index="$1" cap keep=0 i floor
    read -r _ cap _ <<<"${STAGES[$index]}"
    for ((i = index + 1; i < ${#STAGES[@]}; i++)); do
        read -r _ _ floor <<<"${STAGES[$i]}"
        keep=$((keep + floor))
    done
    local left=$((TOTAL - ($(date +%s) - START) - keep))
    [ "$left" -lt "$cap" ] && cap="$left"
    [ "$cap" -lt 5 ] && cap=5
    echo "$cap"
}

: >"$OUT/sanitizer.txt"
for index in "${!STAGES[@]}"; do
    read -r name _ _ <<<"${STAGES[$index]}"
    limit="$(limit_for "$index")"
    echo "== $name (up to ${limit} s)"
    began=$(date +%s)
    timeout --kill-after=10 "$limit" bash "$SELF" --stage "$name" "$OUT"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    [ "$rc" -ne 0 ] && FAILED=1
    seconds=$(($(date +%s) - began))
    RESULTS+=("{\"name\": \"$name\", \"status\": \"$status\", \"exit_code\": $rc, \"seconds\": $seconds, \"limit_s\": $limit}")
    (IFS=,; echo "[${RESULTS[*]}]") >"$OUT/stages.json"
    echo "== $name: $status (${seconds} s)"
done
cat "$OUT/summary.md" 2>/dev/null
echo "GPU check done in $(($(date +%s) - START)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$FAILED"
