"""The Triton launchers as torch.library ops (``ptuning_fast.kernels._common.kernel_op``).

Here the kernels run in Triton's CPU interpreter: each op passes ``opcheck`` (schema, fake
implementation, autograd registration, AOT dispatch) and equals the PyTorch reference; traced on
fake tensors the op is one node of the graph, and compiled (aot_eager) it equals eager. What
inductor gets on a GPU is checked in a subprocess without the interpreter: AOT autograd traces
the ops on meta tensors into ``triton_kernel_wrapper_functional`` nodes (the kernels themselves),
with Triton's mutation analysis run for sm_90.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ptuning_fast
from ptuning_fast.kernels._common import INTERPRETING, KERNELS_TRACEABLE, TRITON_OPS
from ptuning_fast.kernels import prefix_kv as prefix_kernels
from ptuning_fast.kernels import prompt_mlp as mlp_kernels
from ptuning_fast.ops.prefix_kv import prefix_kv
from ptuning_fast.reference.prefix_kv import (encode_prefix_with_hidden_reference, reduce_prefix_grad_reference,
                                              write_prefix_reference)
from ptuning_fast.reference.prompt_mlp import prompt_mlp_reference

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="the kernels run on CPU in Triton's interpreter")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _head(seed, bias_last=False):
    """x (5, 20) and a 20 -> 24 -> 20 head, its last layer without bias unless ``bias_last``."""
    x = _rand(5, 20, seed=seed)
    weights = [_rand(24, 20, seed=seed + 1, scale=0.3), _rand(20, 24, seed=seed + 2, scale=0.3)]
    biases = [_rand(24, seed=seed + 3), _rand(20, seed=seed + 4) if bias_last else None]
    return x, weights, biases


# --------------------------------------------------------------------------------------------
# Prompt MLP
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_last", [False, True])
def test_prompt_mlp_forward_op_passes_opcheck_and_equals_the_reference(bias_last):
    x, weights, biases = _head(1, bias_last)
    args = (x, weights, biases, torch.float32)
    torch.library.opcheck(mlp_kernels.mlp_forward_op, args)
    out, hidden = mlp_kernels.mlp_forward_op(*args)
    torch.testing.assert_close(out, prompt_mlp_reference(x, list(zip(weights, biases))), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, torch.relu(x @ weights[0].t() + biases[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("need", [(True, [True, True], [True, True]), (False, [False, True], [True, False])])
def test_prompt_mlp_backward_op_passes_opcheck_and_equals_autograd(need):
    need_x, need_w, need_b = need
    x, weights, biases = _head(2, bias_last=True)
    grad_out = _rand(5, 20, seed=9)
    _, hidden = mlp_kernels.mlp_forward_op(x, weights, biases, torch.float32)
    args = (grad_out, x, weights, biases, [hidden], torch.float32, need_x, need_w, need_b)
    torch.library.opcheck(mlp_kernels.mlp_backward_op, args)
    grads = mlp_kernels.mlp_backward_op(*args)

    leaves = [t.clone().requires_grad_() for t in [x, *weights, *biases]]
    ref = prompt_mlp_reference(leaves[0], list(zip(leaves[1:3], leaves[3:5])))
    expected = torch.autograd.grad(ref, leaves, grad_out)
    for got, want, needed in zip(grads, expected, [need_x, *need_w, *need_b]):
        if needed:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert got.shape == (0,)


@pytest.mark.parametrize("splits", [2, 3])
def test_prompt_mlp_backward_op_split_passes_opcheck_and_equals_autograd(splits):
    """The backward op with its loop split (a workspace of partial sums and a second kernel
    inside the op): the fake implementation still holds and the gradients equal autograd's."""
    x = _rand(5, 20, seed=70)
    weights = [_rand(72, 20, seed=71, scale=0.3), _rand(100, 72, seed=72, scale=0.2),
               _rand(20, 100, seed=73, scale=0.2)]
    biases = [_rand(72, seed=74), None, _rand(20, seed=75)]
    grad_out = _rand(5, 20, seed=76)
    out, *hidden = mlp_kernels.mlp_forward_op(x, weights, biases, torch.float32)
    args = (grad_out, x, weights, biases, hidden, torch.float32, True, [True] * 3, [True, False, True])
    with mlp_kernels.backward_splits(splits):
        torch.library.opcheck(mlp_kernels.mlp_backward_op, args)
        grads = mlp_kernels.mlp_backward_op(*args)
    leaves = [t.clone().requires_grad_() for t in [x, *weights, biases[0], biases[2]]]
    ref = prompt_mlp_reference(leaves[0], [(leaves[1], leaves[4]), (leaves[2], None), (leaves[3], leaves[5])])
    expected = torch.autograd.grad(ref, leaves, grad_out)
    got = [grads[0], *grads[1:4], grads[4], grads[6]]
    assert grads[5].shape == (0,)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prompt_mlp_op_is_one_node_when_traced_on_fake_tensors():
    """make_fx on fake tensors records the op itself (its fake implementation gives the shapes)."""
    x, weights, biases = _head(3)

    def forward(x, w0, b0, w1):
        return mlp_kernels.mlp_forward_op(x, [w0, w1], [b0, None], torch.float32)[0]

    graph = make_fx(forward, tracing_mode="fake")(x, weights[0], biases[0], weights[1])
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert targets == ["ptuning_fast.prompt_mlp_forward.default", "<built-in function getitem>",
                       "<built-in function getitem>"]


def test_prompt_mlp_triton_compiled_with_fullgraph_equals_eager_and_the_reference():
    """The head on the kernels, compiled (aot_eager, fullgraph): the ops run in the compiled
    forward and backward; loss and every gradient equal eager and the reference."""
    x, weights, biases = _head(4, bias_last=True)
    params = [t.requires_grad_() for t in [*weights, *biases]]
    layers = list(zip(params[:2], params[2:]))
    x.requires_grad_()

    def step(x):
        return ptuning_fast.prompt_mlp_head(x, layers).square().sum()

    with ptuning_fast.use_backend("triton"):
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        got = compiled(x)
        got_grads = torch.autograd.grad(got, [x, *params])
        eager = step(x)
        eager_grads = torch.autograd.grad(eager, [x, *params])
    ref = prompt_mlp_reference(x, layers).square().sum()
    ref_grads = torch.autograd.grad(ref, [x, *params])
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b, c in zip(got_grads, eager_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Prefix kernels
# --------------------------------------------------------------------------------------------
L, HKV, DH, B, CAP = 2, 2, 4, 3, 2
J = L * 2 * HKV * DH


def _projection(seed, tokens=5, dim=12, hidden=16):
    return (_rand(tokens, dim, seed=seed), _rand(hidden, dim, seed=seed + 1, scale=0.3),
            _rand(hidden, seed=seed + 2), _rand(J, hidden, seed=seed + 3, scale=0.3), _rand(J, seed=seed + 4))


def _rows(adapter_index, n):
    order = torch.argsort(adapter_index, stable=True).to(torch.int32)
    row_ptr = torch.zeros(n + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(torch.bincount(adapter_index, minlength=n), 0)
    return order, row_ptr


def test_prefix_hidden_op_passes_opcheck_and_equals_the_reference():
    embedding, w1, b1, _, _ = _projection(10)
    torch.library.opcheck(prefix_kernels.prefix_hidden_op, (embedding, w1, b1))
    expected = torch.tanh(embedding @ w1.t() + b1)
    torch.testing.assert_close(prefix_kernels.prefix_hidden_op(embedding, w1, b1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projected", [False, True])
def test_prefix_write_op_passes_opcheck_and_equals_the_reference(projected):
    """Two adapters of 5 and 3 tokens over 3 rows; the shorter one starts at column 2."""
    weights = [_projection(20), _projection(30, tokens=3)]
    if not projected:
        weights = [(_rand(5, J, seed=40),), (_rand(3, J, seed=41),)]
    adapter_index = torch.tensor([1, 0, 1])
    order, row_ptr = _rows(adapter_index, 2)
    out = torch.zeros(L, 2, B, HKV, 5 + CAP, DH)
    expected = torch.zeros_like(out)
    encoded = [encode_prefix_with_hidden_reference(*w)[0] for w in weights]
    write_prefix_reference(expected, encoded, adapter_index)
    for n, (w, start) in enumerate(zip(weights, (0, 2))):
        source = prefix_kernels.prefix_hidden_op(*w[:3]) if projected else w[0]
        w2, b2 = (w[3], w[4]) if projected else (None, None)
        args = (out, source, w2, b2, order, row_ptr, n, start)
        torch.library.opcheck(prefix_kernels.prefix_write_op, (out.clone(), *args[1:]))
        prefix_kernels.prefix_write_op(*args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_layer", [False, True])
def test_prefix_grad_op_passes_opcheck_and_equals_the_reference(per_layer):
    """The cache gradient (whole, or one layer's keys at column offset J / 4) reduced per adapter."""
    adapter_index = torch.tensor([1, 0, 1])
    order, row_ptr = _rows(adapter_index, 2)
    starts = torch.tensor([0, 2], dtype=torch.int32)
    grad = _rand(B, HKV, 5 + CAP, DH, seed=50) if per_layer else _rand(L, 2, B, HKV, 5 + CAP, DH, seed=50)
    col0 = J // 4 if per_layer else 0
    g = torch.zeros(2, 5, J)
    torch.library.opcheck(prefix_kernels.prefix_grad_op, (grad, g.clone(), order, row_ptr, starts, col0))
    prefix_kernels.prefix_grad_op(grad, g, order, row_ptr, starts, col0)
    expected = torch.zeros_like(g)
    reduce_prefix_grad_reference(grad, expected, adapter_index, [0, 2], col0)
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-5)


def test_prefix_kv_compiled_with_fullgraph_equals_eager():
    """``prefix_kv`` on the kernels, compiled (aot_eager, fullgraph): the prefix ops run in the
    compiled forward and backward; cache and every parameter gradient equal eager."""
    params = [t.requires_grad_() for t in _projection(60)]
    grad_out = _rand(L, 2, B, HKV, 5 + CAP, DH, seed=61)

    def build(*weights):
        return prefix_kv([weights], num_layers=L, num_kv_heads=HKV, head_dim=DH, batch_size=B, capacity=CAP)

    with ptuning_fast.use_backend("triton"):
        compiled = torch.compile(build, backend="aot_eager", fullgraph=True)
        got = compiled(*params)
        got_grads = torch.autograd.grad(got, params, grad_out)
        eager = build(*params)
        eager_grads = torch.autograd.grad(eager, params, grad_out)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# What inductor gets on a GPU
# --------------------------------------------------------------------------------------------
# Runs without TRITON_INTERPRET. Triton finds no GPU driver here, so the driver reports sm_90 as
# its target: torch's mutation analysis of each kernel (which lowers it to TTIR) then runs as on
# an H100. AOT autograd traces on meta tensors: no kernel runs.
_GPU_TRACE = textwrap.dedent("""
    import sys, types, torch, triton
    from triton.backends.compiler import GPUTarget
    triton.runtime.driver.set_active(types.SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32)))
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from ptuning_fast.kernels import prefix_kv as pk, prompt_mlp as pm

    SPLITS, H = int(sys.argv[1]), int(sys.argv[2])  # backward chunks; hidden width (H / 32 n-blocks on meta)
    meta = dict(device="meta")
    x, w0, b0, w1 = (torch.empty(5, 20, **meta), torch.empty(H, 20, **meta), torch.empty(H, **meta),
                     torch.empty(20, H, **meta))
    emb, pw1, pb1, pw2, pb2 = (torch.empty(5, 12, **meta), torch.empty(16, 12, **meta), torch.empty(16, **meta),
                               torch.empty(32, 16, **meta), torch.empty(32, **meta))
    order, row_ptr, starts = (torch.zeros(n, dtype=torch.int32, **meta) for n in (3, 2, 1))

    def step(x, w0, b0, w1, emb, pw1, pb1, pw2, pb2, cache_grad, order, row_ptr, starts):
        out, hidden = pm.mlp_forward_op(x, [w0, w1], [b0, None], torch.float32)
        with pm.backward_splits(SPLITS):
            grads = pm.mlp_backward_op(out, x, [w0, w1], [b0, None], [hidden], torch.float32, True, [True, True],
                                       [True, False])
        h = pk.prefix_hidden_op(emb, pw1, pb1)
        cache = torch.zeros(2, 2, 3, 2, 7, 4, **meta)
        pk.prefix_write_op(cache, h, pw2, pb2, order, row_ptr, 0, 0)
        g = torch.zeros(1, 5, 32, **meta)
        pk.prefix_grad_op(cache_grad, g, order, row_ptr, starts, 0)
        return out, grads, cache, g

    graphs = []
    aot_function(step, fw_compiler=lambda gm, _: graphs.append(gm) or gm)(
        x, w0, b0, w1, emb, pw1, pb1, pw2, pb2, torch.empty(2, 2, 3, 2, 7, 4, **meta), order, row_ptr, starts)
    for node in graphs[0].graph.nodes:
        if node.op == "call_function" and "ptuning_fast" in str(node.target):
            print("OPAQUE", node.target)
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            print("KERNEL", kernel.fn.__name__, ",".join(node.kwargs["tensors_to_clone"]))
""")


def _trace_for_the_gpu(splits: int, hidden: int) -> list:
    """The KERNEL / OPAQUE lines of ``_GPU_TRACE`` run in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _GPU_TRACE, str(splits), str(hidden)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line.startswith(("KERNEL", "OPAQUE"))]


@pytest.mark.skipif(not TRITON_OPS, reason="torch.library.triton_op needs torch >= 2.6")
def test_traced_for_the_gpu_the_graph_holds_the_kernels_and_what_each_writes():
    assert not KERNELS_TRACEABLE  # in this process: the interpreter keeps the ops opaque
    lines = _trace_for_the_gpu(1, 24)
    # Each launch is a node that names its kernel and clones only the tensors the kernel writes
    # (the outputs), so no input is mutated and inductor may schedule them freely.
    assert lines == [
        "KERNEL _linear_kernel c_ptr",  # forward, layer 0 (bias, ReLU)
        "KERNEL _linear_kernel c_ptr",  # forward, layer 1
        "KERNEL _linear_backward_kernel grad_weight_ptr,grad_inp_ptr",  # layer 1: dW, dA (no bias)
        "KERNEL _linear_backward_kernel grad_weight_ptr,grad_bias_ptr,grad_inp_ptr",  # layer 0
        "KERNEL _prefix_hidden_kernel hidden_ptr",
        "KERNEL _prefix_write_kernel out_ptr",
        "KERNEL _prefix_grad_kernel g_ptr",
    ], result.stdout[-3000:]


@pytest.mark.skipif(not TRITON_OPS, reason="torch.library.triton_op needs torch >= 2.6")
def test_traced_for_the_gpu_a_split_backward_is_two_kernels():
    """With the first layer's loop split (72 output features: 3 n-blocks, 2 chunks), the graph
    holds the split backward writing its workspace of partial sums, then the split sum writing
    the input gradient: both kernels stay visible to inductor."""
    lines = _trace_for_the_gpu(2, 72)
    assert lines[2:6] == [
        "KERNEL _linear_backward_kernel grad_weight_ptr,grad_inp_ptr",  # layer 1: 20 outputs, one chunk
        "KERNEL _linear_backward_kernel grad_weight_ptr,grad_bias_ptr,grad_inp_ptr",  # layer 0, split
        "KERNEL _split_sum_kernel out_ptr",
        "KERNEL _prefix_hidden_kernel hidden_ptr",
    ], "\n".join(lines)
