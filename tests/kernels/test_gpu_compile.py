"""Every Triton kernel of the package, in every variant its launchers can pick, compiled ahead of
time for sm_80 (A100) and sm_90 (H100 / H200) by Triton's own toolchain, no GPU needed, and held
to the chip: it compiles, nothing spills (no local memory, no stack frame; the one exception, an
8-byte frame far below the register cap, is explained at aot.TOLERATED_STACK_BYTES), registers
fit the thread (255) and the SM (64K per block), shared memory fits the block (163 KiB on sm_80,
227 KiB on sm_90).

The variants are the launchers' own: each family's ``launch_variants(chip)`` runs the launchers
on meta tensors and records every launch (each config they may pick on that chip), so this
test cannot drift from them; ptuning_fast/kernels/aot.py specialises each launch as Triton's JIT
does, compiles it and reads the cubin. Which input classes are covered, and why the rest compile
to the same code, is stated in each ``launch_variants`` docstring.

The compiles run in a subprocess: conftest.py switches on Triton's interpreter (TRITON_INTERPRET=1)
before Triton is imported here, and under it nothing is compiled. Each run compiles into an empty
Triton cache, so nothing is carried over between runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

kernels = pytest.importorskip("ptuning_fast.kernels.prompt_mlp")  # Triton
import torch  # noqa: E402

from ptuning_fast.kernels import _common, aot  # noqa: E402
from ptuning_fast.kernels._common import CHIPS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KERNELS = {"_linear_kernel", "_linear_backward_kernel", "_split_sum_kernel", "_prefix_hidden_kernel",
           "_prefix_write_kernel", "_prefix_grad_kernel"}


def compile_variants(chip: int, out: Path, cache: Path) -> list[dict]:
    """Rows of ``python -m ptuning_fast.kernels.aot`` for one chip, over every core of the machine:
    the other pytest-xdist workers may be done long before, and the compiles are the long pole."""
    jobs = os.cpu_count() or 1
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "ptuning_fast.kernels.aot", "--chip", str(chip), "--jobs", str(jobs),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, f"the compile run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())["rows"]


@pytest.mark.parametrize("chip", sorted(CHIPS), ids=lambda c: f"sm_{c}")
def test_every_launch_variant_compiles_and_fits(chip, tmp_path):
    rows = compile_variants(chip, tmp_path / "rows.json", tmp_path / "triton-cache")

    failures = [f"sm_{chip} {r['variant']}: " + (r["error"] if "error" in r else "; ".join(r["violations"]))
                for r in rows if r.get("error") or r.get("violations")]
    assert not failures, f"{len(failures)} of {len(rows)} variants fail on sm_{chip}:\n" + "\n".join(failures)

    # Not a vacuous pass: every kernel, in each dtype it is launched with, was compiled.
    assert {r["kernel"] for r in rows} == KERNELS
    mlp_rows = [r for r in rows if r["family"] == "prompt_mlp" and r["kernel"] != "_split_sum_kernel"]
    assert {r["constexprs"]["COMPUTE_DTYPE"] for r in mlp_rows} == {"fp32", "bf16", "fp16"}
    assert {"tf32", "ieee"} <= {r["constexprs"]["INPUT_PRECISION"] for r in mlp_rows}
    cache_dtypes = {r["pointers"][3] for r in rows if r["kernel"] == "_prefix_write_kernel"}
    assert cache_dtypes == {"float32", "bfloat16", "float16"}
    # Exact fp32's fused backward in both forms: its loop split over the output features, and whole.
    fp32_backward = {r["constexprs"]["SPLIT"] for r in rows if r["kernel"] == "_linear_backward_kernel"
                     and r["constexprs"]["COMPUTE_DTYPE"] == "fp32" and r["constexprs"]["INPUT_PRECISION"] == "ieee"}
    assert fp32_backward == {True, False}

    # The launcher's shared-memory estimate, by which it drops configs, bounds the compiler's
    # number: a config it keeps on a chip not compiled here also fits there.
    for r in rows:
        if r["family"] != "prompt_mlp" or r["kernel"] == "_split_sum_kernel":  # the sum: no shared tiles
            continue
        c = r["constexprs"]
        sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
        if r["kernel"] == "_linear_kernel":
            kind, config = "linear", (c["BLOCK_N"], c["BLOCK_K"], r["num_warps"], r["num_stages"])
            operands = (sizes[r["pointers"][0]], sizes[r["pointers"][1]])
        else:
            kind, config = "backward", (c["BLOCK_K"], c["BLOCK_N"], r["num_warps"], r["num_stages"])
            operands = (sizes[r["pointers"][0]], sizes[r["pointers"][2]])
        estimate = kernels._shared_estimate(kind, config, c["BLOCK_M"], operands)
        assert r["shared"] <= estimate, f"sm_{chip} {r['variant']}: {r['shared']} B shared > estimate {estimate} B"


def test_launchers_choose_per_chip():
    """What fits sm_90's 227 KiB but not sm_80's 163 KiB is never offered on sm_80: fp32 operands
    (autocast from fp32 parameters) at 128 rows, where the (64, 64) tile takes ~180 KiB."""
    args = dict(kind="linear", block_m=128, operand_bytes=(4, 4), path="mma16", aligned=True)
    on_80 = kernels.launch_configs(chip=CHIPS[80], **args)
    on_90 = kernels.launch_configs(chip=CHIPS[90], **args)
    assert (64, 64, 4, 3) in on_90 and (64, 64, 4, 3) not in on_80
    assert set(on_80) < set(on_90)
    # The heuristic then takes the next narrower block that fits: never a config left out.
    for chip in (CHIPS[80], CHIPS[90]):
        for programs_along in (16, 1024, 8192):
            pick = kernels._choices(chip=chip, programs_along=programs_along, other_programs=2, **args)[0]
            assert pick in kernels.launch_configs(chip=chip, **args)


def test_fp32_without_tf32_takes_the_fma_configs():
    """Exact fp32 products run on the FMA units: 8 warps and the small tiles of that path,
    never the tensor-core candidates (which spill there)."""
    for block_m in (16, 32, 64, 128):
        for kind in ("linear", "backward"):
            configs = kernels.launch_configs(kind, CHIPS[90], block_m, (4, 4), "fma")
            assert configs and all(c[2] == 8 for c in configs), (kind, block_m, configs)
            assert not set(configs) & set(kernels._LINEAR_CANDIDATES + kernels._BACKWARD_CANDIDATES)


def test_argument_errors():
    with pytest.raises(ValueError, match="`kind` must be 'linear' or 'backward'"):
        kernels.launch_configs("conv", CHIPS[90], 16, (2, 2), "mma16")
    with pytest.raises(ValueError, match="`path` must be"):
        kernels.launch_configs("linear", CHIPS[90], 16, (2, 2), "fp8")
    with pytest.raises(ValueError, match="`family` must be one of"):
        aot.family_variants("attention", CHIPS[90])
    with pytest.raises(TypeError, match="`chip` must be a Chip"):
        aot.family_variants("prompt_mlp", 90)
    with pytest.raises(ValueError, match="`chips` must be among"):
        aot.compile_all(["prompt_mlp"], [75], jobs=1)
    with pytest.raises(ValueError, match="`jobs` must be >= 1"):
        aot.compile_all(["prompt_mlp"], [90], jobs=0)
    with pytest.raises(ValueError, match="`device` must be a CUDA torch.device"):
        _common.chip_of(torch.device("cpu"))
    with pytest.raises(TypeError, match="`allowed` must be a bool"):
        with _common.tf32_allowed("yes"):
            pass
    with pytest.raises(TypeError, match="`chip` must be a Chip"):
        with _common.planning(90):
            pass
    if _common.INTERPRETING:  # this process (conftest.py): planning lists GPU launches only
        with pytest.raises(RuntimeError, match="cannot run under TRITON_INTERPRET=1"):
            with _common.planning(CHIPS[90]):
                pass
