"""The launch plan of the fp32 prompt-MLP backward on sm_90 at d = 768..4096, read from the
compiled kernel: ``python -m benchmarks.backward_plan`` (no GPU needed; not under TRITON_INTERPRET).

For each width: the heuristic's launch (programs, rows and columns per program, warps), the serial
loop over the output features each program runs, and the SASS instruction count of one iteration
of that loop (cuobjdump of the cubin Triton builds for sm_90). Issue-bound estimate of one
program: iterations x warps x instructions per iteration / (4 schedulers x 1 instruction per
cycle) at 1.755 GHz, the H100 SXM's boost clock; with no more programs than SMs (132), that is
the kernel's time. Writes ``results/backward_plan.json``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

WIDTHS = (768, 1024, 2048, 4096)
ROWS = 20  # PEFT's usual num_virtual_tokens
CLOCK_HZ = 1.755e9
SCHEDULERS = 4
OUT = Path(__file__).resolve().parent / "results" / "backward_plan.json"
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass(compiled) -> list:
    """[(address, opcode, operands)] of the kernel's SASS."""
    from ptuning_fast.kernels.aot import cuobjdump

    text = cuobjdump(compiled, "-sass")
    return [(int(a, 16), op, rest) for a, _, op, rest in _LINE.findall(text)]


def loops(instructions: list) -> list:
    """(start, end, instruction count) of each backward branch's range: a loop body."""
    found = []
    for address, op, rest in instructions:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            found.append((start, address, sum(1 for a, _, _ in instructions if start <= a <= address)))
    return found


def plan(width: int) -> dict:
    from ptuning_fast.kernels._common import CHIPS, planning
    from ptuning_fast.kernels.aot import compile_call, resource_usage
    from ptuning_fast.kernels.prompt_mlp import _linear_backward_kernel, mlp_backward, mlp_forward

    chip = CHIPS[90]
    meta = dict(device="meta", dtype=torch.float32)
    x = torch.empty(ROWS, width, **meta)
    weights = [torch.empty(width, width, **meta) for _ in range(3)]
    biases = [torch.empty(width, **meta) for _ in range(3)]
    with planning(chip, defaults_only=True) as calls:
        out, hidden = mlp_forward(x, weights, biases, torch.float32)
        mlp_backward(torch.empty_like(out), x, weights, biases, hidden, torch.float32, True, [True] * 3, [True] * 3)
    call = next(c for c in calls if c.kernel is _linear_backward_kernel)
    compiled = compile_call(call, chip)
    instructions = sass(compiled)
    body = max(loops(instructions), key=lambda loop: loop[2])
    k = call.kwargs
    iterations = -(-width // k["BLOCK_N"])
    per_program_cycles = iterations * k["num_warps"] * body[2] / SCHEDULERS
    programs = call.grid[0]
    return {"d": width, "rows": ROWS, "programs": programs, "sms": chip.sm_count, "BLOCK_M": k["BLOCK_M"],
            "BLOCK_K": k["BLOCK_K"], "BLOCK_N": k["BLOCK_N"], "num_warps": k["num_warps"],
            "loop_iterations": iterations, "sass_total": len(instructions), "sass_per_iteration": body[2],
            "ffma_per_iteration": sum(1 for a, op, _ in instructions if body[0] <= a <= body[1] and op.startswith("FFMA")),
            "registers": resource_usage(compiled).registers,
            "issue_bound_us": per_program_cycles * -(-programs // chip.sm_count) / CLOCK_HZ * 1e6}


def main() -> None:
    rows = [plan(width) for width in WIDTHS]
    OUT.write_text(json.dumps({"chip": "sm_90 (H100)", "clock_hz": CLOCK_HZ, "rule": __doc__.strip(),
                               "layers": rows}, indent=1) + "\n")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
