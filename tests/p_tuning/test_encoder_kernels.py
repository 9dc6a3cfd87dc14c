"""The drop-in PromptEncoder on the Triton path: PEFT parity (error rule), launch count of a
training step, the index check's cache, torch.compile and, on a GPU, CUDA graphs.

On CPU the kernels run in Triton's interpreter under ``use_backend("triton")``.
"""
import pytest
import torch
from peft import PromptEncoderConfig as PeftConfig
from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder

import ptuning_fast
from ptuning_fast import PromptEncoder

from ptuning_fast.kernels import prompt_mlp as kernels  # Triton is a dependency: this must import
from tests.p_tuning import configs

T, D, H = 6, 40, 36  # odd sizes, not multiples of 16


def make_config(kind="MLP", submodules=1, **kw):
    return configs.make_config(T, D, H, kind, submodules, **kw)


def make_encoders(config, seed=0):
    """PEFT's encoder with fresh random weights, ours with the same, and an fp64 PEFT oracle."""
    peft_enc = PeftPromptEncoder(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    ours = PromptEncoder(config)
    ours.load_state_dict(peft_enc.state_dict())
    oracle = PeftPromptEncoder(config).double()
    oracle.load_state_dict(peft_enc.state_dict())
    return peft_enc, ours, oracle


def indices_for(rows, total, batch=3):
    if rows == "expanded":  # what PeftModel passes
        return torch.arange(total).unsqueeze(0).expand(batch, -1)
    if rows == "contiguous":
        return torch.arange(total).repeat(batch, 1)
    if rows == "permuted":  # one row, not in order: the lookup path
        return torch.randperm(total, generator=torch.Generator().manual_seed(1)).unsqueeze(0).expand(batch, -1)
    return torch.randint(0, total, (batch, total), generator=torch.Generator().manual_seed(2))


def forward_backward(module, indices, upstream):
    module.zero_grad(set_to_none=True)
    out = module(indices)
    (out.double() * upstream).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def assert_error_rule(got, ref, exact, what):
    tiny = 1e-6 * max(1.0, exact.abs().max().item())
    err = (got.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + tiny, f"{what}: {err:.3e} > 2 x {ref_err:.3e} + {tiny:.1e}"


# ----------------------------------------------------------------------------- parity with PEFT
@pytest.mark.parametrize("kind,submodules,rows", [
    ("MLP", 1, "expanded"), ("MLP", 2, "contiguous"), ("MLP", 1, "permuted"), ("MLP", 1, "random"),
    ("LSTM", 1, "expanded"), ("LSTM", 2, "random"),
])
def test_matches_peft_fp32(kind, submodules, rows):
    peft_enc, ours, oracle = make_encoders(make_config(kind, submodules), seed=3)
    total = T * submodules
    indices = indices_for(rows, total)
    upstream = torch.randn(3, total, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with ptuning_fast.use_backend("triton"):
        out, grads = forward_backward(ours, indices, upstream)
    ref, ref_grads = forward_backward(peft_enc, indices, upstream)
    exact, exact_grads = forward_backward(oracle, indices, upstream)
    assert out.shape == ref.shape == (3, total, D)
    assert_error_rule(out, ref, exact, "output")
    for name in exact_grads:
        assert_error_rule(grads[name], ref_grads[name], exact_grads[name], name)


@pytest.mark.parametrize("mode", ["bf16-parameters", "fp16-parameters", "autocast-bf16"])
def test_low_precision_within_the_reference_error(mode):
    """Low precision: error vs the fp64 oracle at most 2x that of the same encoder on the PyTorch
    path in the same dtype (which, like PeftModel's ``.repeat``, sums the gradient over the batch
    in the parameter dtype); the output also within 2x of PEFT's own error."""
    peft_enc, ours, oracle = make_encoders(make_config("MLP"), seed=5)
    indices = indices_for("expanded", T, batch=2)
    upstream = torch.randn(2, T, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    autocast = mode.startswith("autocast")
    if not autocast:
        dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float16
        peft_enc.to(dtype)
        ours.to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with ptuning_fast.use_backend("triton"):
            out, grads = forward_backward(ours, indices, upstream)
        with ptuning_fast.use_backend("reference"):
            ref, ref_grads = forward_backward(ours, indices, upstream)
        peft_out, _ = forward_backward(peft_enc, indices, upstream)
    exact, exact_grads = forward_backward(oracle, indices, upstream)
    assert out.dtype == ref.dtype == peft_out.dtype
    assert_error_rule(out, ref, exact, "output")
    assert_error_rule(out, peft_out, exact, "output vs PEFT")
    for name in exact_grads:
        assert grads[name].dtype == ref_grads[name].dtype, name
        assert_error_rule(grads[name], ref_grads[name], exact_grads[name], name)


# ----------------------------------------------------------------------------- a training step
class LaunchLog:
    """Stands in for a Triton kernel object and records each launch by name."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def record(*args, **kwargs):
            self.log.append(self.name)
            return launch(*args, **kwargs)

        return record


def test_training_step_is_three_launches_each_way_and_no_lookup(monkeypatch):
    """PeftModel's indices: forward = one launch per layer, backward = one per layer, no
    embedding lookup or scatter; the output is one encoded prompt viewed over the batch."""
    _, ours, _ = make_encoders(make_config("MLP"), seed=7)
    log = []
    monkeypatch.setattr(kernels, "_linear_kernel", LaunchLog(kernels._linear_kernel, "forward", log))
    monkeypatch.setattr(kernels, "_linear_backward_kernel", LaunchLog(kernels._linear_backward_kernel, "backward", log))
    lookups = []
    embedding = torch.nn.functional.embedding
    monkeypatch.setattr(torch.nn.functional, "embedding", lambda *a, **k: lookups.append(1) or embedding(*a, **k))
    indices = indices_for("expanded", T, batch=4)
    with ptuning_fast.use_backend("triton"):
        out = ours(indices)
        assert log == ["forward"] * 3 and out.stride(0) == 0
        out.sum().backward()
    assert log == ["forward"] * 3 + ["backward"] * 3
    assert lookups == []
    assert all(p.grad is not None for p in ours.parameters())


def test_index_check_runs_on_every_call(monkeypatch):
    """Index values are read on every call: nothing about an index tensor is remembered, so an
    in-place change (even one that bumps no version counter) is always seen."""
    _, ours, _ = make_encoders(make_config("MLP"), seed=8)
    reads = []  # one entry per read of index values (the range and order check)
    for name in ("equal", "aminmax"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=original, _n=name, **k: reads.append(_n) or _f(*a, **k))
    prompt_tokens = torch.arange(T)
    indices = prompt_tokens.unsqueeze(0).expand(2, -1)
    with ptuning_fast.use_backend("triton"):
        first = ours(indices)
        second = ours(prompt_tokens.unsqueeze(0).expand(2, -1))
        assert reads == ["aminmax", "aminmax"]  # one check of the values per call
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        prompt_tokens.data[2] = T  # a write through .data: no version bump, still checked
        with pytest.raises(ValueError, match=rf"`indices` holds indices outside \[0, {T}\)"):
            ours(indices)
        prompt_tokens.data[2] = 0  # in range but out of order: the lookup path, PEFT's rows
        swapped = ours(indices)
        torch.testing.assert_close(swapped[:, 2], first[:, 0], rtol=0, atol=0)
        assert reads == ["aminmax"] * 4
        with ptuning_fast.value_checks("never"):  # what an accelerator does: no read, the lookup path
            torch.testing.assert_close(ours(indices), swapped, rtol=0, atol=0)
        assert reads == ["aminmax"] * 4


def test_eval_with_kernels_encodes_from_the_current_weights():
    _, ours, _ = make_encoders(make_config("MLP"), seed=9)
    ours.eval()
    indices = indices_for("expanded", T, batch=2)
    with ptuning_fast.use_backend("triton"), torch.no_grad():
        first = ours(indices).clone()
        torch.testing.assert_close(first[0], ours._encode_sequences(ours.embedding.weight.unsqueeze(0))[0],
                                   rtol=0, atol=0)
        ours.mlp_head[-1].bias.data.add_(1.0)
        second = ours(indices)
    torch.testing.assert_close(second, first + 1.0, rtol=1e-6, atol=1e-6)


def test_peft_model_get_prompt_with_our_encoder():
    """Swapped into a PeftModel, our encoder gives PEFT's prompts and gradients."""
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=D, n_head=2, vocab_size=50, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    model = get_peft_model(base, PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, encoder_hidden_size=H))
    peft_enc = model.prompt_encoder["default"]
    ours = PromptEncoder(model.peft_config["default"])
    ours.load_state_dict(peft_enc.state_dict())
    upstream = torch.randn(3, T, D, generator=torch.Generator().manual_seed(10))
    ref = model.get_prompt(batch_size=3)
    (ref * upstream).sum().backward()
    model.prompt_encoder["default"] = ours
    with ptuning_fast.use_backend("triton"):
        got = model.get_prompt(batch_size=3)
        (got * upstream).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(peft_enc.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- torch.compile
def test_compiled_encoder_has_no_graph_break_and_same_numbers():
    import torch._dynamo

    _, ours, _ = make_encoders(make_config("MLP"), seed=11)
    indices = indices_for("expanded", T, batch=2)
    upstream = torch.randn(2, T, D, generator=torch.Generator().manual_seed(12))

    def step(indices):
        return (ours(indices) * upstream).sum()

    with ptuning_fast.use_backend("triton"):
        explained = torch._dynamo.explain(step)(indices)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        got = compiled(indices)
        got_grads = torch.autograd.grad(got, list(ours.parameters()))
        ref = step(indices)
        ref_grads = torch.autograd.grad(ref, list(ours.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- GPU
def _cuda_encoder(d, h, seed=13):
    config = make_config("MLP", num_virtual_tokens=20, token_dim=d, encoder_hidden_size=h)
    torch.manual_seed(seed)
    return PromptEncoder(config).cuda(), torch.arange(20, device="cuda").unsqueeze(0)


@pytest.mark.cuda
def test_cuda_graph_captures_a_training_step():
    ours, indices = _cuda_encoder(768, 768)
    params = list(ours.parameters())
    upstream = torch.randn(1, 20, 768, device="cuda")

    def step():
        return torch.autograd.grad((ours(indices) * upstream).sum(), params)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # tunes the launch configs and checks the indices, outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = step()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.01)
    graph.replay()
    eager = step()
    for a, b in zip(static_grads, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_inductor_compile_matches_eager():
    import torch._dynamo

    ours, indices = _cuda_encoder(1024, 1024)
    params = list(ours.parameters())
    upstream = torch.randn(1, 20, 1024, device="cuda")

    def step(indices):
        return (ours(indices) * upstream).sum()

    explained = torch._dynamo.explain(step)(indices)
    assert explained.graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True)
    got = torch.autograd.grad(compiled(indices), params)
    ref = torch.autograd.grad(step(indices), params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_narrow_index_dtype_never_takes_the_in_order_shortcut():
    """A uint8 row of 300 entries that equals arange(300) cast to uint8 wraps at 256: those are
    indices 0..255, 0..43, not 0..299, so the answer must come from the lookup."""
    total = 300
    config = configs.make_config(total, 8, 8, "MLP", 1)
    _, ours, _ = make_encoders(config, seed=11)
    for batch in (1, 2):
        wrapped = torch.arange(total).to(torch.uint8).unsqueeze(0).expand(batch, -1)
        with torch.no_grad():
            got = ours(wrapped)
            expected = ours(wrapped.long())  # the same values, read as int64
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(got[:, 256:], got[:, :44], rtol=0, atol=0)
