"""The deep-prompt prefix op (``prefix_kv``) and its cache buffer against the reference and PEFT.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), so the
shapes are tiny but odd (head_dim 5, 3 KV heads, hidden 11): blocks are partly masked everywhere.
Error rule: with the fp64 reference as the oracle, the op's error is at most twice the error of
the reference run in the tested dtype, plus a tiny absolute term; for the output and for the
gradient of every parameter. GPU tests (marked ``cuda``) repeat the check at Llama-7B sizes.
"""
from typing import NamedTuple

import pytest
import torch
from ptuning_fast import prefix_kv, use_backend
from ptuning_fast.ops import PrefixGeometry, PrefixKVBuffer, PrefixWeights
from ptuning_fast.reference import encode_prefix_reference, prefix_kv_reference


class Sizes(NamedTuple):
    L: int  # layers
    HKV: int  # KV heads
    DH: int  # head size
    D: int  # embedding width (projection)
    HH: int  # projection hidden size

    @property
    def J(self):
        return self.L * 2 * self.HKV * self.DH


SMALL = Sizes(L=2, HKV=3, DH=5, D=7, HH=11)  # odd on purpose
L, HKV, DH, D, HH, J = *SMALL, SMALL.J
BACKENDS = ["reference", "triton"]


def make_weights(T, projected, dtype=torch.float32, *, seed=0, device="cpu", sizes=SMALL):
    """One adapter's random prefix parameters, scaled so everything stays O(1)."""
    g = torch.Generator().manual_seed(seed)
    D, HH, J = sizes.D, sizes.HH, sizes.J

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    if not projected:
        return PrefixWeights(rnd(T, J))
    return PrefixWeights(rnd(T, D), rnd(HH, D, scale=D ** -0.5), rnd(HH, scale=0.5),
                         rnd(J, HH, scale=HH ** -0.5), rnd(J, scale=0.5))


def params(weights):
    return [t for w in weights for t in w if t is not None]


def oracle_copy(weights):
    return [PrefixWeights(*[None if t is None else t.detach().double().requires_grad_() for t in w]) for w in weights]


def reference_op(weights, index, dtype, sizes=SMALL):
    encoded = [encode_prefix_reference(*w) for w in weights]
    return prefix_kv_reference(encoded, index, sizes.L, sizes.HKV, sizes.DH, dtype=dtype)


def grads_of(out, weights, upstream):
    return torch.autograd.grad(out, params(weights), upstream.to(out.dtype))


def error(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_error_rule(got, same_dtype_ref, oracle, what):
    tiny = 1e-6 * max(1.0, oracle.abs().max().item())
    err, ref_err = error(got, oracle), error(same_dtype_ref, oracle)
    assert err <= 2 * ref_err + tiny, f"{what}: error {err:.3e} > 2 x reference error {ref_err:.3e} + {tiny:.1e}"


def check_op(weights, index, out_dtype, backend, capacity=0, seed=3, sizes=SMALL):
    """prefix_kv (on ``backend``) vs the reference in the tested dtype vs the fp64 oracle."""
    P = max(w.num_tokens for w in weights)
    with use_backend(backend):
        got = prefix_kv(weights, index, num_layers=sizes.L, num_kv_heads=sizes.HKV, head_dim=sizes.DH,
                        dtype=out_dtype, capacity=capacity)
    assert got.shape == (sizes.L, 2, index.shape[0], sizes.HKV, P + capacity, sizes.DH) and got.dtype == out_dtype
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed)).to(got.device)
    got_grads = grads_of(got, weights, upstream)
    if capacity:
        assert got[..., P:, :].abs().max().item() == 0  # room for the text: zeros

    ref = reference_op(weights, index, out_dtype, sizes)
    ref_grads = grads_of(ref, weights, upstream[..., :P, :])
    exact_w = oracle_copy(weights)
    exact = reference_op(exact_w, index, torch.float64, sizes)
    exact_grads = grads_of(exact, exact_w, upstream[..., :P, :].double())

    assert_error_rule(got[..., :P, :], ref, exact, "output")
    names = [f"adapter{n}.{f}" for n, w in enumerate(weights)
             for f, t in zip(PrefixWeights._fields, w) if t is not None]
    for name, g, r, e, p in zip(names, got_grads, ref_grads, exact_grads, params(weights)):
        assert g.dtype == p.dtype and g.shape == p.shape, name
        assert_error_rule(g, r, e, f"grad {name}")
    return got, got_grads


# ----------------------------------------------------------------------------- reference
def test_reference_matches_peft_get_prompt_layout():
    """For one adapter, the reference is PEFT's view(B, T, 2L, H, Dh).permute(2, 0, 3, 1, 4)."""
    T, B = 4, 3
    prefix = torch.randn(T, J)
    ours = prefix_kv_reference([prefix], torch.zeros(B, dtype=torch.long), L, HKV, DH)
    peft = prefix.expand(B, T, J).reshape(B, T, L * 2, HKV, DH).permute(2, 0, 3, 1, 4)  # (2L, B, H, T, Dh)
    for layer in range(L):
        key, value = peft.split(2)[layer]
        assert torch.equal(ours[layer, 0], key) and torch.equal(ours[layer, 1], value)


def test_layer_views_of_one_layer_equal_those_of_all_layers():
    """prefix_layer_kv (one layer's keys and values) is entries 2l, 2l + 1 of prefix_layer_views,
    which for one adapter are PEFT's layout; with leading dimensions (several adapters) too."""
    from ptuning_fast.reference.prefix_kv import prefix_layer_kv, prefix_layer_views

    T, B = 4, 3
    prefix = torch.randn(T, J)
    peft = prefix.expand(B, T, J).reshape(B, T, L * 2, HKV, DH).permute(2, 0, 3, 1, 4)  # (2L, B, H, T, Dh)
    for encoded in (prefix, torch.randn(2, T, J)):
        every = prefix_layer_views(encoded, HKV, DH)
        assert len(every) == 2 * L
        for layer in range(L):
            key, value = prefix_layer_kv(encoded, layer, HKV, DH)
            assert torch.equal(key, every[2 * layer]) and torch.equal(value, every[2 * layer + 1])
            assert key.data_ptr() == every[2 * layer].data_ptr()  # a view, no copy
            if encoded.dim() == 2:
                assert torch.equal(key, peft[2 * layer, 0]) and torch.equal(value, peft[2 * layer + 1, 0])


def gradcheck_two_adapters(op):
    """gradcheck, in float64, of ``op(weights, index)`` over a projected and a plain adapter
    shared by three rows."""
    w = [PrefixWeights(*[t.detach().double().requires_grad_() for t in make_weights(3, True)]),
         PrefixWeights(torch.randn(2, J, dtype=torch.float64, requires_grad=True))]
    index = torch.tensor([1, 0, 1])

    def fn(*flat):
        it = iter(flat)
        return op([PrefixWeights(*[next(it) for _ in range(5)]), PrefixWeights(next(it))], index)

    assert torch.autograd.gradcheck(fn, tuple(params(w)), eps=1e-6, atol=1e-5)


def test_gradcheck_reference_float64():
    gradcheck_two_adapters(lambda ws, index: reference_op(ws, index, torch.float64))


# ----------------------------------------------------------------------------- the op
def test_gradcheck_op_float64():
    """float64 runs on the reference path: gradcheck checks the op's hand-written backward."""
    with use_backend("triton"):
        gradcheck_two_adapters(lambda ws, index: prefix_kv(ws, index, num_layers=L, num_kv_heads=HKV, head_dim=DH,
                                                           capacity=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("projected", [False, True])
def test_one_adapter_fp32(backend, projected):
    weights = [make_weights(4, projected)]
    check_op(weights, torch.zeros(3, dtype=torch.long), torch.float32, backend, capacity=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("projected", [False, True])
def test_mixed_adapters_with_unequal_lengths(backend, projected):
    """Rows pick their adapter; the shorter prefix fills the last columns, zeros before it."""
    weights = [make_weights(T, projected, seed=seed) for T, seed in ((5, 1), (2, 2), (3, 3))]
    index = torch.tensor([1, 0, 1, 1, 0])  # adapter 2 has no row: its gradients must be zero
    got, grads = check_op(weights, index, torch.float32, backend)
    assert got[:, :, index == 1, :, :3].abs().max().item() == 0
    unused = params([weights[2]])
    for g in grads[-len(unused):]:
        assert g.abs().max().item() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float16, torch.float16)])
def test_low_precision(backend, param_dtype, out_dtype):
    """fp32 adapters in a bf16 model (PEFT's default), and fully half-precision adapters."""
    weights = [make_weights(3, True, param_dtype, seed=4), make_weights(3, False, param_dtype, seed=5)]
    check_op(weights, torch.tensor([0, 1, 0]), out_dtype, backend)


def test_triton_matches_reference_backend_exactly_without_projection():
    """Without projection the op is a pure copy: both backends give the same bits, gradients too."""
    weights = [make_weights(3, False, seed=6), make_weights(4, False, seed=7)]
    index = torch.tensor([1, 1, 0, 1])
    up = torch.randn(L, 2, 4, HKV, 4, DH)
    outs = []
    for backend in BACKENDS:
        with use_backend(backend):
            out = prefix_kv(weights, index, num_layers=L, num_kv_heads=HKV, head_dim=DH)
            outs.append((out, grads_of(out, weights, up)))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_non_contiguous_gradient_and_frozen_parameters():
    """Expanded upstream gradient (stride 0) and a frozen first layer: only what is asked is returned."""
    w = make_weights(3, True, seed=8)
    w = PrefixWeights(w.embedding.detach(), w.w1.detach(), w.b1.detach(), w.w2, w.b2)
    for backend in BACKENDS:
        with use_backend(backend):
            out = prefix_kv(w, batch_size=2, num_layers=L, num_kv_heads=HKV, head_dim=DH)
            d_w2, d_b2 = torch.autograd.grad(out.sum(), [w.w2, w.b2])
        ref = reference_op([w], torch.zeros(2, dtype=torch.long), torch.float32)
        r_w2, r_b2 = torch.autograd.grad(ref.sum(), [w.w2, w.b2])
        torch.testing.assert_close(d_w2, r_w2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d_b2, r_b2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffer_layerwise_gradient_equals_whole_gradient(backend):
    """PrefixKVBuffer takes the gradient one layer at a time (as the cache does): same result."""
    weights = [make_weights(3, True, seed=9), make_weights(2, False, seed=10)]
    index = torch.tensor([0, 1, 1, 0])
    upstream = torch.randn(L, 2, 4, HKV, 3, DH)
    with use_backend(backend):
        buffer = PrefixKVBuffer(weights, PrefixGeometry(L, HKV, DH), adapter_index=index, capacity=4)
        for layer in range(L):
            buffer.accumulate_layer_grad(layer, upstream[layer, 0], upstream[layer, 1])
        got = torch.autograd.grad(buffer.token, params(weights))
    ref = reference_op(weights, index, torch.float32)
    torch.testing.assert_close(buffer.storage[..., :3, :], ref.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(got, grads_of(ref, weights, upstream)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert buffer.prompt_lengths().tolist() == [3, 2, 2, 3]


def test_argument_errors():
    w = make_weights(3, True)
    kw = dict(num_layers=L, num_kv_heads=HKV, head_dim=DH)
    with pytest.raises(ValueError, match=r"`weights\[0\]` encodes .* values per virtual token"):
        prefix_kv(w, batch_size=2, num_layers=L + 1, num_kv_heads=HKV, head_dim=DH)
    with pytest.raises(ValueError, match="a projection needs w1, b1, w2 and b2"):
        prefix_kv(PrefixWeights(w.embedding, w.w1, w.b1), batch_size=2, **kw)
    with pytest.raises(ValueError, match=r"`weights\[0\].w1` has in_features"):
        prefix_kv(PrefixWeights(torch.randn(3, D + 1), w.w1, w.b1, w.w2, w.b2), batch_size=2, **kw)
    with pytest.raises(ValueError, match=r"`weights\[0\].b2` has"):
        prefix_kv(PrefixWeights(w.embedding, w.w1, w.b1, w.w2, torch.randn(J + 1)), batch_size=2, **kw)
    with pytest.raises(TypeError, match=r"`weights\[0\].embedding` must have dtype"):
        prefix_kv(torch.zeros(3, J, dtype=torch.long), batch_size=2, **kw)
    with pytest.raises(ValueError, match=r"`weights\[0\].embedding` must have 2 dimensions"):
        prefix_kv(torch.randn(3, J, 1), batch_size=2, **kw)
    with pytest.raises(TypeError, match=r"`weights\[0\]` must be a PrefixWeights"):
        prefix_kv([{"embedding": w.embedding}], batch_size=2, **kw)
    with pytest.raises(ValueError, match="non-empty list"):
        prefix_kv([], batch_size=2, **kw)
    with pytest.raises(ValueError, match="`adapter_index` is required with 2 adapters"):
        prefix_kv([w, w], batch_size=2, **kw)
    with pytest.raises(ValueError, match="give `batch_size`"):
        prefix_kv(w, **kw)
    with pytest.raises(ValueError, match=r"`adapter_index` holds indices outside \[0, 2\)"):
        prefix_kv([w, w], torch.tensor([0, 2]), **kw)
    with pytest.raises(ValueError, match="`adapter_index` holds indices outside"):
        prefix_kv([w, w], torch.tensor([-1, 0]), **kw)
    with pytest.raises(TypeError, match="`adapter_index` must have dtype"):
        prefix_kv(w, torch.tensor([0.0, 0.0]), **kw)
    with pytest.raises(ValueError, match="`adapter_index` has 2 entries but batch_size is 3"):
        prefix_kv(w, torch.tensor([0, 0]), batch_size=3, **kw)
    with pytest.raises(ValueError, match="`adapter_index` must have 1 dimensions"):
        prefix_kv(w, torch.zeros(2, 1, dtype=torch.long), **kw)
    with pytest.raises(TypeError, match="`dtype` must be a floating torch.dtype"):
        prefix_kv(w, batch_size=2, dtype=torch.int32, **kw)
    with pytest.raises(ValueError, match="`capacity` must be >= 0"):
        prefix_kv(w, batch_size=2, capacity=-1, **kw)
    with pytest.raises(TypeError, match="`head_dim` must be an int"):
        prefix_kv(w, batch_size=2, num_layers=L, num_kv_heads=HKV, head_dim=5.0)
    with pytest.raises(ValueError, match="`batch_size` must be > 0"):
        prefix_kv(w, batch_size=0, **kw)


# ----------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.cuda
@pytest.mark.parametrize("kv_heads", [32, 8])
@pytest.mark.parametrize("param_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float32, torch.float32)])
def test_cuda_llama7b_sizes(kv_heads, param_dtype, out_dtype):
    """L=32, 32 or 8 KV heads, head_dim 128, T=64 (and a second adapter with T=48), Hh=512, B=8."""
    sizes = Sizes(L=32, HKV=kv_heads, DH=128, D=kv_heads * 128, HH=512)
    weights = [make_weights(64, True, param_dtype, seed=11, device="cuda", sizes=sizes),
               make_weights(48, False, param_dtype, seed=12, device="cuda", sizes=sizes)]
    index = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0], device="cuda")
    check_op(weights, index, out_dtype, "triton", sizes=sizes)
