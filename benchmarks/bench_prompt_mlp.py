"""P-tuning prompt encoder (MLP), forward + backward: ptuning_fast vs PEFT eager vs torch.compile(PEFT).

What is timed is one training step of the encoder as ``PeftModel.get_prompt`` runs it: the
encoder on one row of prompt tokens, ``.repeat(B, 1, 1)``, then the backward of a fixed upstream
gradient into every encoder parameter (gradients reset to None before each step, as
``zero_grad()`` does). The prompt tokens live on the device (PeftModel copies them from the host
every step, a synchronising copy that would cost both sides the same).

- ``ptuning_fast``: our drop-in ``PromptEncoder`` (backend ``auto``: the Triton kernels on CUDA,
  three launches forward and three backward; the PyTorch reference path on CPU).
- ``peft_eager``: ``peft.tuners.p_tuning.PromptEncoder``.
- ``peft_compile``: ``torch.compile`` of PEFT's step (skipped, with a note, where it fails).
- ``ptuning_fast_cuda_graph`` / ``peft_cuda_graph`` (CUDA only): each step captured once in a CUDA
  graph and replayed, the step without its host overhead (every row also reports ``host_ms``).

Correctness first: before anything is timed, our output and every gradient are checked against an
fp64 copy of PEFT's encoder with the project's error rule (error <= 2 x PEFT's error in the same
dtype + a tiny term); a wrong result raises and posts no number.

Floor: the parameter bytes read plus the gradient bytes written, over the measured copy bandwidth,
and at least one launch (the FLOPs at T = 20 are negligible, they are included anyway).
"""
from __future__ import annotations

import torch
from peft import PromptEncoderConfig as PeftConfig
from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder

from benchmarks.common import Row, cuda_graph_replay, floor_ms, make_rows, size_of
from ptuning_fast import PromptEncoder

COMPONENT = "prompt_mlp"
BATCH = 8
# (T, d = token_dim, h = encoder_hidden_size, autocast dtype or None)
CASES = {
    "gpu": [(20, 768, 768, None), (20, 1024, 1024, None), (20, 4096, 4096, None),
            (20, 1024, 1024, torch.bfloat16), (20, 4096, 4096, torch.bfloat16)],
    "cpu": [(20, 384, 384, None), (20, 768, 768, None), (20, 1024, 1024, None), (20, 768, 768, torch.bfloat16)],
    "tiny": [(8, 64, 64, None), (20, 96, 80, None)],
}


def make_encoders(tokens: int, dim: int, hidden: int, device: torch.device, *, seed: int = 0):
    """PEFT's encoder with fresh random weights, ours with the same weights, and an fp64 oracle."""
    config = PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, token_dim=dim, encoder_hidden_size=hidden,
                        num_transformer_submodules=1, num_layers=1, num_attention_heads=1)
    torch.manual_seed(seed)
    peft_enc = PeftPromptEncoder(config).to(device)
    with torch.no_grad():
        for p in peft_enc.parameters():
            p.normal_(0.0, 1.0 / max(p.shape[-1], 1) ** 0.5)
    ours = PromptEncoder(config).to(device)
    ours.load_state_dict(peft_enc.state_dict())
    oracle = PeftPromptEncoder(config).to(device).double()
    oracle.load_state_dict(peft_enc.state_dict())
    return peft_enc, ours, oracle


def step_fn(encoder, prompt_tokens, upstream, autocast_dtype, forward=None):
    """One training step of ``encoder`` as PeftModel runs it; returns (output, grads) when asked."""
    params = list(encoder.parameters())
    device_type = prompt_tokens.device.type
    forward = forward or (lambda tokens: encoder(tokens).repeat(upstream.shape[0], 1, 1))

    def step(return_grads=False):
        for p in params:
            p.grad = None
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None,
                            cache_enabled=False):  # no cast cache: the step may be captured in a CUDA graph
            out = forward(prompt_tokens)
        out.backward(upstream.to(out.dtype))
        if return_grads:
            return out.detach(), [p.grad.detach().clone() for p in params]
        return None

    return step


def check(ours_step, peft_step, oracle_step, case: str) -> None:
    """Our output and gradients within 2x PEFT's error against the fp64 oracle, or raise."""
    out, grads = ours_step(True)
    ref, ref_grads = peft_step(True)
    exact, exact_grads = oracle_step(True)
    for name, a, b, e in [("output", out, ref, exact)] + [
            (f"grad {i}", a, b, e) for i, (a, b, e) in enumerate(zip(grads, ref_grads, exact_grads))]:
        err = (a.double() - e).abs().max().item()
        ref_err = (b.double() - e).abs().max().item()
        tiny = 1e-6 * max(1.0, e.abs().max().item())
        if not err <= 2 * ref_err + tiny:
            raise AssertionError(f"{case}: ptuning_fast {name} error {err:.3e} exceeds 2 x PEFT's {ref_err:.3e}")


def step_bytes_and_flops(encoder, tokens: int) -> tuple:
    params = list(encoder.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    mlp_macs = sum(m.weight.numel() for m in encoder.mlp_head if isinstance(m, torch.nn.Linear)) * tokens
    return 2 * param_bytes, 6 * mlp_macs  # read weights + write grads; fwd 2 + bwd 4 FLOPs per MAC


def measure(device: torch.device, quick: bool) -> list[Row]:
    rows = []
    size = size_of(device, quick)
    reps, warmup = {"tiny": (100, 10), "cpu": (30, 3), "gpu": (100, 10)}[size]
    for tokens, dim, hidden, autocast_dtype in CASES[size]:
        case = f"T={tokens} d={dim} h={hidden} B={BATCH} " + (
            f"autocast-{str(autocast_dtype).replace('torch.', '')}" if autocast_dtype else "fp32")
        peft_enc, ours, oracle = make_encoders(tokens, dim, hidden, device)
        prompt_tokens = torch.arange(tokens, device=device).unsqueeze(0)
        upstream = torch.randn(BATCH, tokens, dim, device=device)
        ours_step = step_fn(ours, prompt_tokens, upstream, autocast_dtype)
        peft_step = step_fn(peft_enc, prompt_tokens, upstream, autocast_dtype)
        check(ours_step, peft_step, step_fn(oracle, prompt_tokens, upstream.double(), None), case)

        moved, flops = step_bytes_and_flops(peft_enc, tokens)
        floor = floor_ms(device, bytes_moved=moved, flops=flops,
                         dtype=autocast_dtype or torch.float32, launches=1)
        info = dict(tokens=tokens, dim=dim, hidden=hidden, batch=BATCH, bytes_moved=moved)
        steps = {"ptuning_fast": ours_step, "peft_eager": peft_step}
        # A step is a few microseconds of GPU work: host-bound. Under CUDA graph replay it costs
        # the kernels alone (ours has no host sync while capturing; neither has PEFT's).
        for impl, step in (("ptuning_fast_cuda_graph", ours_step), ("peft_cuda_graph", peft_step)):
            replay = cuda_graph_replay(step, device)
            if replay is not None:
                steps[impl] = replay
        rows += make_rows(COMPONENT, case, steps, device, floor, warmup=warmup, reps=reps, **info)
        try:
            compiled = torch.compile(lambda tokens: peft_enc(tokens).repeat(BATCH, 1, 1))
            compiled_step = step_fn(peft_enc, prompt_tokens, upstream, autocast_dtype, forward=compiled)
            compiled_step()  # compiles, outside the timing
        except Exception as exc:  # e.g. no working C++ compiler for inductor on this machine
            print(f"   peft_compile skipped for {case}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        else:
            rows += make_rows(COMPONENT, case, {"peft_compile": compiled_step}, device, floor, warmup=warmup,
                              reps=reps, **info)
    return rows


# pytest-benchmark tests at small CPU sizes (CI): each checks the result before timing.
def _tiny_steps():
    device = torch.device("cpu")
    peft_enc, ours, oracle = make_encoders(8, 48, 40, device)
    tokens = torch.arange(8).unsqueeze(0)
    upstream = torch.randn(4, 8, 48)
    ours_step = step_fn(ours, tokens, upstream, None)
    peft_step = step_fn(peft_enc, tokens, upstream, None)
    check(ours_step, peft_step, step_fn(oracle, tokens, upstream.double(), None), "tiny")
    return ours_step, peft_step


def test_bench_prompt_mlp_ptuning_fast(benchmark):
    ours_step, _ = _tiny_steps()
    benchmark(ours_step)


def test_bench_prompt_mlp_peft_eager(benchmark):
    _, peft_step = _tiny_steps()
    benchmark(peft_step)
