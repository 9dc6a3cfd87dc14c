"""The Triton MLP-head kernels against the PyTorch reference: forward and every gradient.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), so the
shapes are tiny but odd: feature counts that are not multiples of 16 and cross the interpreter's
32-wide blocks, T = 1, T > 128 (the tiled backward), leading batch dims, strided inputs.
Error rule: with the fp64 reference as the oracle, the kernel's error is at most twice the error
of the reference run in the tested dtype, plus a tiny absolute term.
GPU tests (marked ``cuda``) repeat the check at the real sizes.
"""
import pytest
import torch

import ptuning_fast
from ptuning_fast import prompt_mlp_head
from ptuning_fast.reference import prompt_mlp_reference

kernels = pytest.importorskip("ptuning_fast.kernels.prompt_mlp")  # Triton
from ptuning_fast.kernels._common import CHIPS  # noqa: E402
from ptuning_fast.ops import prompt_mlp as ops_prompt_mlp  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_head(dims, dtype=torch.float32, *, bias=True, seed=0, device="cpu"):
    """Random layers D0 -> D1 -> ... with weights scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
        b = torch.randn(d_out, generator=g) * 0.5 if bias else None
        layers.append((w.to(device, dtype).requires_grad_(),
                       b.to(device, dtype).requires_grad_() if b is not None else None))
    return layers


def flat_inputs(x, layers):
    return [x] + [t for layer in layers for t in layer if t is not None]


def run(fn, x, layers, upstream):
    """Output and the gradients of every input that requires one (None elsewhere)."""
    out = fn(x, layers)
    inputs = flat_inputs(x, layers)
    wanted = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, upstream.to(out.dtype)))
    return out, [next(grads) if t.requires_grad else None for t in inputs]


def as_oracle(x, layers):
    """fp64 copies (same values) with the same requires_grad flags."""
    def cp(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    return cp(x), [(cp(w), cp(b)) for w, b in layers]


def error(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_error_rule(got, same_dtype_ref, oracle, what):
    tiny = 1e-6 * max(1.0, oracle.abs().max().item())
    err, ref_err = error(got, oracle), error(same_dtype_ref, oracle)
    assert err <= 2 * ref_err + tiny, (
        f"{what}: kernel error {err:.3e} > 2 x reference error {ref_err:.3e} + {tiny:.1e}")


def check_against_reference(x, layers, *, autocast_dtype=None, seed=1):
    """Kernel vs reference (same dtype) vs fp64 oracle, output and all gradients."""
    out_dim = layers[-1][0].shape[0]
    upstream = torch.randn(*x.shape[:-1], out_dim, generator=torch.Generator().manual_seed(seed))

    def kernel(x, layers):
        return ops_prompt_mlp.prompt_mlp_triton(x, layers)

    if autocast_dtype is not None:
        with torch.autocast("cpu", dtype=autocast_dtype):
            got, got_grads = run(kernel, x, layers, upstream)
            ref, ref_grads = run(prompt_mlp_reference, x, layers, upstream)
    else:
        got, got_grads = run(kernel, x, layers, upstream)
        ref, ref_grads = run(prompt_mlp_reference, x, layers, upstream)
    ox, olayers = as_oracle(x, layers)
    exact, exact_grads = run(prompt_mlp_reference, ox, olayers, upstream.double())

    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert_error_rule(got, ref, exact, "output")
    names = ["x"] + [f"{kind}{i}" for i, (w, b) in enumerate(layers) for kind, t in (("W", w), ("b", b)) if t is not None]
    for name, g, r, e in zip(names, got_grads, ref_grads, exact_grads):
        assert (g is None) == (r is None), name
        if g is None:
            continue
        assert g.dtype == r.dtype and g.shape == r.shape, name
        assert_error_rule(g, r, e, f"grad {name}")
    return got, got_grads


# ----------------------------------------------------------------------------- forward + backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 20])
def test_mlp_encoder_head(dtype, rows):
    """PEFT's MLP head D -> H -> H -> D, odd sizes, every dtype, T = 1 and 20."""
    layers = make_head((40, 72, 72, 40), dtype)
    x = torch.randn(rows, 40, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_()
    check_against_reference(x, layers)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_head_two_layers(dtype):
    """The head after PEFT's bi-LSTM: 2H -> 2H -> D, on a (1, T, 2H) input."""
    layers = make_head((36, 36, 24), dtype, seed=3)
    x = torch.randn(1, 9, 36, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_()
    check_against_reference(x, layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_take_the_tiled_backward(dtype):
    """T > 128 rows: the backward splits into a dW/db launch and a dX launch per layer."""
    assert 150 > kernels.FUSED_BACKWARD_MAX_ROWS
    layers = make_head((24, 40, 40, 24), dtype, seed=5)
    x = torch.randn(150, 24, generator=torch.Generator().manual_seed(6)).to(dtype).requires_grad_()
    check_against_reference(x, layers)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_fp32_parameters(autocast_dtype):
    """fp32 parameters under autocast: computed in the autocast dtype as F.linear does,
    gradients come back fp32."""
    layers = make_head((40, 72, 72, 40), torch.float32, seed=7)
    x = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(8)).requires_grad_()
    out, grads = check_against_reference(x, layers, autocast_dtype=autocast_dtype)
    assert out.dtype == autocast_dtype
    assert all(g.dtype == torch.float32 for g in grads)


def test_strided_inputs_and_leading_dims():
    """Transposed views for x and every weight, a strided upstream gradient, (B, T, D) input."""
    g = torch.Generator().manual_seed(9)
    layers = []
    for d_in, d_out in [(33, 50), (50, 50), (50, 33)]:
        w = (torch.randn(d_in, d_out, generator=g) / d_in ** 0.5).t().requires_grad_()  # (out, in), stride (1, out)
        b = torch.randn(2 * d_out, generator=g)[::2].requires_grad_()  # stride 2
        assert not w.is_contiguous() and not b.is_contiguous()
        layers.append((w, b))
    x = torch.randn(33, 6, generator=g).t().requires_grad_()
    assert not x.is_contiguous()
    check_against_reference(x, layers)
    x3 = torch.randn(2, 3, 33, generator=g).requires_grad_()
    check_against_reference(x3, layers)


def test_no_bias_and_frozen_parameters():
    """Layers without bias; a frozen weight and an x without grad get no gradient, the rest do."""
    layers = make_head((24, 40, 40, 24), torch.float32, seed=10)
    layers[1] = (layers[1][0], None)
    layers[0][0].requires_grad_(False)
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(11))
    _, grads = check_against_reference(x, layers)
    assert grads[0] is None and grads[1] is None  # x, W0
    assert all(g is not None for g in grads[2:])


def test_only_last_layer_trains():
    """The backward stops at the last layer that needs a gradient."""
    layers = make_head((24, 40, 24), torch.float32, seed=12)
    for t in (layers[0][0], layers[0][1], layers[1][0]):
        t.requires_grad_(False)
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(13))
    _, grads = check_against_reference(x, layers)
    assert [g is None for g in grads] == [True, True, True, True, False]


def test_gradcheck_reference_float64():
    """The oracle's gradients themselves, for the 2-layer head with and without bias."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w0 = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w1 = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b1 = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w0, w1, b1: prompt_mlp_reference(x, [(w0, None), (w1, b1)]),
                                    (x, w0, w1, b1))


# ----------------------------------------------------------------------------- split backward
class KernelLog:
    """Stands in for a Triton kernel object and records the grid of each launch."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(grid)
        return self.kernel[grid]


def split_launches(monkeypatch):
    """(grids of the fused backward, grids of the split sum) as they are launched."""
    backward, sums = [], []
    monkeypatch.setattr(kernels, "_linear_backward_kernel", KernelLog(kernels._linear_backward_kernel, backward))
    monkeypatch.setattr(kernels, "_split_sum_kernel", KernelLog(kernels._split_sum_kernel, sums))
    return backward, sums


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_split_backward_equals_the_reference(monkeypatch, dtype, splits):
    """The fused backward with its loop over the output features cut into 1, 2 and 3 chunks
    (the interpreter's 32-wide n-blocks: 100 features are 4 blocks, so 3 chunks are uneven and
    the last block is partial; 40 features are 2 blocks, so a third chunk is not made)."""
    backward, sums = split_launches(monkeypatch)
    layers = make_head((40, 100, 72, 40), dtype, seed=30)
    x = torch.randn(20, 40, generator=torch.Generator().manual_seed(31)).to(dtype).requires_grad_()
    with kernels.backward_splits(splits):
        _, grads = check_against_reference(x, layers, seed=32)
    # Layers backward from the last: (K input, N output features) = (72, 40), (100, 72), (40, 100),
    # so (3, 4, 2) programs along K and (2, 3, 4) blocks of 32 along N.
    expected = [(3,), (4,), (2,)] if splits == 1 else [(3, min(splits, 2)), (4, splits), (2, splits)]
    assert backward == expected
    assert len(sums) == (0 if splits == 1 else 3)
    if dtype == torch.float32:  # against the float64 oracle directly, too
        ox, olayers = as_oracle(x, layers)
        upstream = torch.randn(20, 40, generator=torch.Generator().manual_seed(32))
        _, exact = run(prompt_mlp_reference, ox, olayers, upstream.double())
        for g, e in zip(grads, exact):
            torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)


def test_split_backward_is_deterministic_and_close_to_one_chunk(monkeypatch):
    """The partial sums are added in a fixed order: the same split gives the same bits; the
    chunk count changes only the fp32 rounding. Six chunks of 200 features (7 blocks): the split
    sum runs past its first UNROLL partials."""
    backward, sums = split_launches(monkeypatch)
    assert 6 > kernels._SPLIT_SUM_UNROLL
    layers = make_head((40, 200, 200, 40), seed=33)
    x = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(34)).requires_grad_()
    upstream = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(35))

    def kernel(x, layers):
        return ops_prompt_mlp.prompt_mlp_triton(x, layers)

    with kernels.backward_splits(6):
        check_against_reference(x, layers, seed=35)
        assert [grid[1] for grid in backward] == [2, 6, 6] and len(sums) == 3
        _, first = run(kernel, x, layers, upstream)
        _, second = run(kernel, x, layers, upstream)
    with kernels.backward_splits(1):
        _, whole = run(kernel, x, layers, upstream)
    for a, b, c in zip(first, second, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_split_backward_with_frozen_parts_and_no_bias(monkeypatch):
    """Split without an input gradient to reduce (the first layer under an x without grad: dW
    alone, no workspace, no sum) and without bias or weight gradients."""
    backward, sums = split_launches(monkeypatch)
    layers = make_head((40, 100, 100, 40), seed=36)
    layers[1] = (layers[1][0].detach(), None)  # frozen, no bias: dA only
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(37))
    with kernels.backward_splits(2):
        _, grads = check_against_reference(x, layers, seed=38)
    assert grads[0] is None and grads[3] is None
    assert backward == [(4, 2), (4, 2), (2, 2)] and len(sums) == 2  # layers 2 and 1 reduce dA; layer 0 has none


def test_split_plan_splits_exact_fp32_only():
    """On sm_90 (132 SMs), T = 20: exact fp32 at d = 768..4096 cuts the loop into chunks, at most
    two programs per SM and far fewer iterations each than the d / 16 of one chunk; TF32 and
    16-bit products (a few instructions per iteration) keep one launch."""
    chip = CHIPS[90]
    for d in (768, 1024, 2048, 4096):
        config = kernels._choices("backward", chip, 32, (4, 4), "fma", True, d, d // 16)[0]
        assert config[0] == 64, config  # the widest block: the split, not the block, makes programs
        k_programs, n_blocks = d // config[0], d // config[1]
        splits = kernels._split_plan("fma", k_programs, n_blocks, chip.sm_count)
        assert splits > 1 and k_programs * splits <= 2 * chip.sm_count, (d, splits)
        assert -(-n_blocks // splits) <= n_blocks // 4, (d, splits)
        for path in ("tf32", "mma16"):
            assert kernels._split_plan(path, k_programs, n_blocks, chip.sm_count) == 1
    assert kernels._split_plan("fma", 12, 48, 132) == 11  # d = 768: one wave of 132 programs, <= 5 iterations
    assert kernels._split_plan("fma", 64, 1, 132) == 1  # one n-block: nothing to split
    assert kernels._split_plan("fma", 300, 64, 132) == 1  # two waves already


_PLAN_SCRIPT = """
import torch
from ptuning_fast.kernels._common import CHIPS, planning, tf32_allowed
from ptuning_fast.kernels.prompt_mlp import mlp_backward, mlp_forward
for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
    meta = dict(device="meta", dtype=dtype)
    x, w = torch.empty(20, 768, **meta), torch.empty(768, 768, **meta)
    with tf32_allowed(tf32), planning(CHIPS[90], defaults_only=True) as calls:
        out, hidden = mlp_forward(x, [w, w], [None, None], dtype)
        mlp_backward(torch.empty_like(out), x, [w, w], [None, None], hidden, dtype, True, [True] * 2, [False] * 2)
    print(dtype, tf32, [(c.kernel.__name__, c.grid) for c in calls if c.kernel.__name__ != "_linear_kernel"])
"""


def test_launcher_plans_the_split_at_d768_exact_fp32_only():
    """The launchers themselves, planned for sm_90 (outside the interpreter, in a subprocess):
    at T = 20, d = 768 exact fp32 launches the split backward (11 chunks of 12 input-feature
    blocks) and its split sum per layer; TF32 and bf16 the single launch (48 blocks of 16)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    split = [("_linear_backward_kernel", (12, 11)), ("_split_sum_kernel", (15,))]
    assert result.stdout.splitlines() == [
        f"torch.float32 False {split * 2}",
        "torch.float32 True [('_linear_backward_kernel', (48,)), ('_linear_backward_kernel', (48,))]",
        "torch.bfloat16 False [('_linear_backward_kernel', (48,)), ('_linear_backward_kernel', (48,))]",
    ], result.stdout


def test_backward_splits_argument_errors():
    with pytest.raises(TypeError, match="`splits` must be an int"):
        with kernels.backward_splits(2.0):
            pass
    with pytest.raises(TypeError, match="`splits` must be an int"):
        with kernels.backward_splits(True):
            pass
    with pytest.raises(ValueError, match="`splits` must be >= 1"):
        with kernels.backward_splits(0):
            pass


# ----------------------------------------------------------------------------- dispatch
def test_dispatch_follows_the_backend_switch(monkeypatch):
    calls = []
    original = ops_prompt_mlp.prompt_mlp_triton
    monkeypatch.setattr(ops_prompt_mlp, "prompt_mlp_triton", lambda x, layers: calls.append(1) or original(x, layers))
    layers = make_head((20, 24, 20), seed=15)
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(16))
    with ptuning_fast.use_backend("triton"):
        got = prompt_mlp_head(x, layers)
    assert calls == [1]
    with ptuning_fast.use_backend("auto"):  # auto on CPU: the reference
        ref = prompt_mlp_head(x, layers)
    assert calls == [1]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with ptuning_fast.use_backend("triton"):  # fp64 is the oracle dtype: always the reference
        out64 = prompt_mlp_head(x.double(), [(w.double(), b.double()) for w, b in layers])
    assert calls == [1] and out64.dtype == torch.float64


def test_triton_op_under_compile_has_no_graph_break():
    """Dynamo traces the head (custom ops in the graph, forward and backward) in one graph."""
    import torch._dynamo

    layers = make_head((20, 24, 24, 20), seed=17)
    x = torch.randn(1, 5, 20, generator=torch.Generator().manual_seed(18), requires_grad=True)
    inputs = flat_inputs(x, layers)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops_prompt_mlp.prompt_mlp_triton(x, layers).float().square().sum()

    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got_grads = torch.autograd.grad(got, inputs)
    ref = step(x)
    ref_grads = torch.autograd.grad(ref, inputs)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiled_with_frozen_parts_and_no_bias():
    """Under torch.compile: layers without bias, a frozen weight and an x without grad."""
    layers = make_head((20, 24, 24, 20), seed=19)
    layers[0] = (layers[0][0].detach(), None)
    layers[2] = (layers[2][0], None)
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(20))
    inputs = [t for t in flat_inputs(x, layers) if t.requires_grad]

    def step(x):
        return ops_prompt_mlp.prompt_mlp_triton(x, layers).square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got_grads = torch.autograd.grad(compiled(x), inputs)
    ref_grads = torch.autograd.grad(prompt_mlp_reference(x, layers).square().sum(), inputs)
    assert len(got_grads) == 3  # W1, b1, W2
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors
def test_argument_errors():
    layers = make_head((8, 12, 8))
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        prompt_mlp_head([[1.0] * 8], layers)
    with pytest.raises(TypeError, match=r"`x` must have dtype in \(float32"):
        prompt_mlp_head(torch.ones(3, 8, dtype=torch.long), layers)
    with pytest.raises(ValueError, match="`x` must have at least 1 dimension"):
        prompt_mlp_head(torch.tensor(1.0), layers)
    with pytest.raises(ValueError, match="`layers` must be a non-empty list"):
        prompt_mlp_head(x, [])
    with pytest.raises(ValueError, match=r"`layers\[1\]` must be a \(weight, bias\) pair"):
        prompt_mlp_head(x, [layers[0], layers[1][0]])
    with pytest.raises(ValueError, match=r"`layers\[0\].weight` has in_features 8, expected 9"):
        prompt_mlp_head(torch.randn(3, 9), layers)
    with pytest.raises(ValueError, match=r"`layers\[1\].weight` has in_features 12, expected 13"):
        prompt_mlp_head(x, [(torch.randn(13, 8), None), layers[1]])
    with pytest.raises(ValueError, match=r"`layers\[0\].bias` has 5 elements, expected 12"):
        prompt_mlp_head(x, [(layers[0][0], torch.randn(5)), layers[1]])
    with pytest.raises(ValueError, match=r"`layers\[0\].weight` must have 2 dimensions"):
        prompt_mlp_head(x, [(torch.randn(12, 8, 1), None)])
    with pytest.raises(ValueError, match=r"`layers\[0\].weight` is on meta but must be on cpu"):
        prompt_mlp_head(x, [(torch.randn(12, 8, device="meta"), None)])
    with pytest.raises(TypeError, match=r"`layers\[1\].bias` has dtype torch.bfloat16 but `x` has torch.float32"):
        prompt_mlp_head(x, [layers[0], (layers[1][0], layers[1][1].to(torch.bfloat16))])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts mixed dtypes, as F.linear does
        mixed = prompt_mlp_head(x, [layers[0], (layers[1][0], layers[1][1].to(torch.bfloat16))])
    assert mixed.dtype == torch.bfloat16


def test_errors_are_raised_before_the_kernels():
    with ptuning_fast.use_backend("triton"):
        with pytest.raises(ValueError, match=r"`layers\[0\].weight` has in_features 8, expected 9"):
            prompt_mlp_head(torch.randn(2, 9), make_head((8, 4)))


# ----------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.cuda
@pytest.mark.parametrize("rows,dims", [
    (20, (768, 768, 768, 768)), (20, (1024, 1024, 1024, 1024)), (20, (4096, 4096, 4096, 4096)),
    (1, (384, 1000, 1000, 384)), (512, (2560, 2560, 2560, 2560)), (100, (8192, 1000, 1000, 8192)),
    (20, (2000, 2000, 768)),  # the head after an LSTM with H = 1000
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_real_sizes(rows, dims, dtype):
    layers = make_head(dims, dtype, seed=20, device="cuda")
    x = torch.randn(rows, dims[0], device="cuda").to(dtype).requires_grad_()
    check_against_reference_cuda(x, layers)


@pytest.mark.cuda
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast(autocast_dtype):
    layers = make_head((1024, 1024, 1024, 1024), torch.float32, seed=21, device="cuda")
    x = torch.randn(20, 1024, device="cuda", requires_grad=True)
    check_against_reference_cuda(x, layers, autocast_dtype=autocast_dtype)


def check_against_reference_cuda(x, layers, autocast_dtype=None):
    upstream = torch.randn(*x.shape[:-1], layers[-1][0].shape[0], device=x.device)
    with torch.autocast("cuda", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        got, got_grads = run(ops_prompt_mlp.prompt_mlp_triton, x, layers, upstream)
        ref, ref_grads = run(prompt_mlp_reference, x, layers, upstream)
    ox, olayers = as_oracle(x, layers)
    exact, exact_grads = run(prompt_mlp_reference, ox, olayers, upstream.double())
    assert got.dtype == ref.dtype
    assert_error_rule(got, ref, exact, "output")
    for i, (g, r, e) in enumerate(zip(got_grads, ref_grads, exact_grads)):
        assert g.dtype == r.dtype, i
        assert_error_rule(g, r, e, f"grad {i}")
