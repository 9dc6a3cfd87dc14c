"""Ahead-of-time compile of the package's kernel launches for a GPU that need not be there.

Every launch a launcher can make on a chip is listed by the family's ``launch_variants(chip)``
(the launchers themselves run on ``meta`` tensors under :func:`~._common.planning`). Each such
:class:`~._common.KernelCall` is specialised as Triton's JIT specialises it at launch (the same
binder: an int equal to 1 becomes a constant, ints that are multiples of 16 and 16-byte aligned
pointers get divisibility hints; meta tensors count as aligned, as the CUDA caching allocator's
blocks are), compiled for the chip's target by Triton's bundled toolchain (no driver, no GPU) and
its cubin's resource usage read with the bundled ``cuobjdump``. :func:`violations` holds that
usage against the chip.

Run it as ``python -m ptuning_fast.kernels.aot --chip 80 --chip 90 --jobs 2 --out FILE.json``
(the compile check, tests/kernels/test_gpu_compile.py, does), in a process without
TRITON_INTERPRET: under the interpreter the kernels are not compiled at all.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, NamedTuple, Sequence

from ._common import CHIPS, MAX_REGISTERS_PER_THREAD, REGISTERS_PER_SM, Chip, KernelCall

FAMILIES = ("prompt_mlp", "prefix_kv")


class Resources(NamedTuple):
    """Per-thread registers, stack and local (spill) bytes; per-block shared bytes (Triton's
    dynamic allocation plus any static), and threads per block."""

    registers: int
    stack: int
    local: int
    shared: int
    threads: int


def family_variants(family: str, chip: Chip, *, defaults_only: bool = False) -> List[KernelCall]:
    """``launch_variants`` of one kernel family module, without duplicates (launches that the JIT
    would compile to the same kernel)."""
    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES}, got {family!r}")
    if not isinstance(chip, Chip):
        raise TypeError(f"`chip` must be a Chip, got {type(chip).__name__}")
    import importlib

    module = importlib.import_module(f"{__package__}.{family}")
    unique: Dict[str, KernelCall] = {}
    for call in module.launch_variants(chip, defaults_only=defaults_only):
        unique.setdefault(_specialization(call, chip)[0], call)
    return list(unique.values())


def _specialization(call: KernelCall, chip: Chip):
    """(cache key, signature, constexprs, attrs, options) of ``call`` as the JIT would build them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = call.kernel
    backend = make_backend(GPUTarget("cuda", chip.capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*call.args, **call.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, call.kwargs, bound, specialization, options)
    key = f"{fn.__name__}|{specialization}|{sorted(call.kwargs.items(), key=lambda kv: kv[0])}"
    return key, signature, constexprs, attrs, options


def facts(call: KernelCall) -> dict:
    """The variant as plain data: kernel, pointer dtypes, int arguments (sizes and strides, as
    specialised), constexpr arguments, warps and stages."""
    constants = {k: getattr(v, "name", v) for k, v in call.kwargs.items() if k not in ("num_warps", "num_stages")}
    return {"kernel": call.kernel.__name__,
            "pointers": [str(a.dtype).replace("torch.", "") for a in call.args if hasattr(a, "data_ptr")],
            "ints": {name: a for name, a in zip(call.kernel.arg_names, call.args) if isinstance(a, int)},
            "constexprs": constants,
            "num_warps": call.kwargs.get("num_warps", 4),
            "num_stages": call.kwargs.get("num_stages", 3)}  # Triton's CUDA defaults


def describe(call: KernelCall) -> str:
    """The variant in words, for failure messages: kernel[pointer dtypes; constexprs; warps stages]."""
    f = facts(call)
    constants = " ".join(f"{k}={v}" for k, v in f["constexprs"].items())
    return (f"{f['kernel']}[{','.join(f['pointers'])}; {constants}; "
            f"warps={f['num_warps']} stages={f['num_stages']}]")


def compile_call(call: KernelCall, chip: Chip):
    """The compiled kernel (``triton.compiler.CompiledKernel``) of ``call`` for ``chip``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, signature, constexprs, attrs, options = _specialization(call, chip)
    source = ASTSource(fn=call.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", chip.capability, 32), options=options.__dict__)


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump(compiled, flag: str) -> str:
    """What Triton's bundled ``cuobjdump FLAG`` prints for a compiled kernel's cubin."""
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, path], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(compiled) -> Resources:
    """Registers, stack, spills (cuobjdump on the cubin) and shared memory of a compiled kernel."""
    report = cuobjdump(compiled, "--dump-resource-usage")
    usage = _USAGE.findall(report)
    if len(usage) != 1:
        raise RuntimeError(f"expected one function in the cubin of {compiled.name}, cuobjdump says:\n{report}")
    registers, stack, static_shared, local = map(int, usage[0])
    return Resources(registers, stack, local, compiled.metadata.shared + static_shared,
                     compiled.metadata.num_warps * 32)


# A stack frame this small, at a register count this far below the cap, is not register
# pressure: ptxas parks one or two values across the loop (seen: one STL before the loop and
# one LDL after it, at 72 registers), a store and a load per program against the loop's
# thousands. Anything larger, or near the cap, is a spill.
TOLERATED_STACK_BYTES, TOLERATED_AT_REGISTERS = 8, 128


def violations(resources: Resources, chip: Chip) -> List[str]:
    """What in ``resources`` would not run, or would run spilling, on ``chip`` (empty if nothing)."""
    found = []
    parked = resources.stack <= TOLERATED_STACK_BYTES and resources.registers <= TOLERATED_AT_REGISTERS
    if resources.local or (resources.stack and not parked):
        found.append(f"spills: {resources.local} B local, {resources.stack} B stack per thread (want 0)")
    if resources.registers > MAX_REGISTERS_PER_THREAD:
        found.append(f"{resources.registers} registers per thread > {MAX_REGISTERS_PER_THREAD}")
    if resources.registers * resources.threads > REGISTERS_PER_SM:
        found.append(f"{resources.registers} registers x {resources.threads} threads = "
                     f"{resources.registers * resources.threads} > the SM's {REGISTERS_PER_SM}")
    if resources.shared > chip.shared_bytes:
        found.append(f"{resources.shared} B shared memory > sm_{chip.capability}'s {chip.shared_bytes} B per block")
    return found


# --------------------------------------------------------------------------------------------
# Many variants, in parallel: workers enumerate the same list and compile their share by index
# (kernel objects do not cross process boundaries).
# --------------------------------------------------------------------------------------------
def _compile_share(task) -> List[dict]:
    family, capability, indices, defaults_only = task
    chip = CHIPS[capability]
    calls = family_variants(family, chip, defaults_only=defaults_only)
    rows = []
    for index in indices:
        call = calls[index]
        row = {"family": family, "chip": capability, "variant": describe(call), **facts(call)}
        start = time.perf_counter()
        try:
            row.update(compile_call_usage(call, chip))
        except Exception as exc:  # reported per variant: the check names what failed to compile
            row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        row["seconds"] = round(time.perf_counter() - start, 3)
        rows.append(row)
    return rows


def compile_call_usage(call: KernelCall, chip: Chip) -> dict:
    """Resources of ``call`` compiled for ``chip`` and what in them violates its limits."""
    usage = resource_usage(compile_call(call, chip))
    return {**usage._asdict(), "violations": violations(usage, chip)}


def compile_all(families: Sequence[str], chips: Sequence[int], jobs: int, *, defaults_only: bool = False) -> List[dict]:
    """Compile every variant of ``families`` for each chip capability in ``chips`` with ``jobs``
    processes; one result row per variant (resources, violations, or the compile error)."""
    if jobs < 1:
        raise ValueError(f"`jobs` must be >= 1, got {jobs}")
    unknown = [c for c in chips if c not in CHIPS]
    if unknown:
        raise ValueError(f"`chips` must be among {sorted(CHIPS)}, got {unknown}")
    tasks = []
    for family in families:
        for capability in chips:
            count = len(family_variants(family, CHIPS[capability], defaults_only=defaults_only))
            # Interleaved shares: the variants are listed small to large, so each job gets a mix.
            shares = max(1, min(count, 4 * jobs))
            tasks += [(family, capability, list(range(i, count, shares)), defaults_only) for i in range(shares)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return [row for rows in pool.map(_compile_share, tasks) for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptuning_fast.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--chip", type=int, action="append", choices=sorted(CHIPS),
                        help="compute capability to compile for (repeatable; default: all known)")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="kernel family (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--defaults-only", action="store_true", help="only the heuristic's pick of each launch")
    parser.add_argument("--out", required=True, help="JSON file for the result rows")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    start = time.perf_counter()
    rows = compile_all(args.family or FAMILIES, args.chip or sorted(CHIPS), args.jobs,
                       defaults_only=args.defaults_only)
    with open(args.out, "w") as handle:
        json.dump({"rows": rows, "seconds": round(time.perf_counter() - start, 1)}, handle, indent=1)
    failed = sum(1 for r in rows if r.get("error") or r.get("violations"))
    print(f"{len(rows)} variants compiled in {time.perf_counter() - start:.0f} s; {failed} failing; rows in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
