"""The launch plan of the fp32 prompt-MLP backward on sm_90 at d = 768..4096, read from the
compiled kernels: ``python -m benchmarks.backward_plan`` (no GPU needed; not under TRITON_INTERPRET).

For each width, two plans of the fused backward: ``one_chunk`` (``backward_splits(1)``: the single
launch the package made before split-K, each program walking all d/16 output-feature blocks) and
``split`` (the launcher's default: the loop cut into chunks by ``_split_plan``, plus the split sum).
Per plan: programs (input-feature blocks x chunks), rows and columns per program, warps, the
serial loop iterations of the longest program, and the SASS instruction count of one iteration
of that loop (cuobjdump of the cubin Triton builds for sm_90). Issue-bound estimate:
iterations x warps x instructions per iteration / (4 schedulers x 1 instruction per cycle) at
1.755 GHz (the H100 SXM's boost clock) per program, times the programs one SM runs back to back,
cdiv(programs, 132). The split sum is estimated the same way from its own loop (its launch gap,
~1-3 us on a stream, is not in the estimate). Writes ``results/backward_plan.json``.
"""
from __future__ import annotations

import contextlib
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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _loop_estimate(call, chip, iterations: int) -> dict:
    """Compile ``call`` for ``chip``, find its longest loop body and estimate the launch."""
    from ptuning_fast.kernels.aot import compile_call, resource_usage

    compiled = compile_call(call, chip)
    instructions = sass(compiled)
    body = max(loops(instructions), key=lambda loop: loop[2])
    warps = call.kwargs["num_warps"]
    programs = 1
    for g in call.grid:
        programs *= g
    per_program_cycles = iterations * warps * body[2] / SCHEDULERS
    return {"programs": programs, "num_warps": warps, "loop_iterations": iterations,
            "sass_total": len(instructions), "sass_per_iteration": body[2],
            "ffma_per_iteration": sum(1 for a, op, _ in instructions if body[0] <= a <= body[1] and op.startswith("FFMA")),
            "registers": resource_usage(compiled).registers,
            "issue_bound_us": per_program_cycles * _cdiv(programs, chip.sm_count) / CLOCK_HZ * 1e6}


def plan(width: int, splits=None) -> dict:
    """The heuristic's backward launch of a width x width layer at T = ROWS (``splits``: forced)."""
    from ptuning_fast.kernels._common import CHIPS, planning
    from ptuning_fast.kernels.prompt_mlp import (_linear_backward_kernel, _split_sum_kernel, backward_splits,
                                                 mlp_backward, mlp_forward)

    chip = CHIPS[90]
    meta = dict(device="meta", dtype=torch.float32)
    x = torch.empty(ROWS, width, **meta)
    weights = [torch.empty(width, width, **meta) for _ in range(3)]
    biases = [torch.empty(width, **meta) for _ in range(3)]
    forced = backward_splits(splits) if splits is not None else contextlib.nullcontext()
    with planning(chip, defaults_only=True) as calls, forced:
        out, hidden = mlp_forward(x, weights, biases, torch.float32)
        mlp_backward(torch.empty_like(out), x, weights, biases, hidden, torch.float32, True, [True] * 3, [True] * 3)
    # The middle layer: every gradient and the ReLU gate (the heaviest flags).
    index, call = next((i, c) for i, c in enumerate(calls)
                       if c.kernel is _linear_backward_kernel and c.kwargs["GATE_GRAD_INPUT"])
    k = call.kwargs
    chunks = call.grid[1] if len(call.grid) > 1 else 1
    iterations = _cdiv(_cdiv(width, k["BLOCK_N"]), chunks)
    row = {"d": width, "rows": ROWS, "sms": chip.sm_count, "chunks": chunks, "k_programs": call.grid[0],
           "BLOCK_M": k["BLOCK_M"], "BLOCK_K": k["BLOCK_K"], "BLOCK_N": k["BLOCK_N"],
           **_loop_estimate(call, chip, iterations)}
    row["split_sum"] = None
    following = calls[index + 1] if index + 1 < len(calls) else None
    if following is not None and following.kernel is _split_sum_kernel:
        s = following.kwargs
        row["split_sum"] = _loop_estimate(following, chip, _cdiv(chunks, s["UNROLL"]))
        row["split_sum"]["partials_bytes"] = chunks * ROWS * width * 4
    row["total_issue_bound_us"] = row["issue_bound_us"] + (row["split_sum"] or {}).get("issue_bound_us", 0.0)
    return row


def main() -> None:
    rows = [{"one_chunk": plan(width, 1), "split": plan(width)} for width in WIDTHS]
    OUT.write_text(json.dumps({"chip": "sm_90 (H100)", "clock_hz": CLOCK_HZ, "rule": __doc__.strip(),
                               "layers": rows}, indent=1) + "\n")
    for r in rows:
        one, split = r["one_chunk"], r["split"]
        print(f"d={one['d']}: one chunk {one['programs']} programs x {one['loop_iterations']} iterations "
              f"({one['sass_per_iteration']} SASS) ~{one['total_issue_bound_us']:.1f} us; split "
              f"{split['programs']} programs ({split['chunks']} chunks) x {split['loop_iterations']} iterations "
              f"({split['sass_per_iteration']} SASS) ~{split['issue_bound_us']:.1f} us + sum "
              f"~{(split['split_sum'] or {}).get('issue_bound_us', 0.0):.2f} us")


if __name__ == "__main__":
    main()
