"""The Triton kernels keep NaN and Inf where PyTorch keeps them: a diverged run must show as NaN
through the fast path too (torch.relu(NaN) is NaN; a NaN activation passes its gradient in
torch's ReLU backward). The output and every gradient have the reference's NaN and Inf pattern,
and the finite values agree."""
import pytest
import torch
from tests.ops.test_prefix_kv import SMALL, grads_of, make_weights, params, reference_op
from tests.ops.test_prompt_mlp import make_head, run

from ptuning_fast import prefix_kv, use_backend
from ptuning_fast.reference import prompt_mlp_reference

pytest.importorskip("ptuning_fast.kernels.prompt_mlp")  # Triton
from ptuning_fast.kernels.prompt_mlp import backward_splits  # noqa: E402
from ptuning_fast.ops import prompt_mlp as ops_prompt_mlp  # noqa: E402


def assert_same_nonfinite_pattern(got, expected, what):
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), f"{what}: NaN pattern differs"
    assert torch.equal(torch.isposinf(got), torch.isposinf(expected)), f"{what}: +Inf pattern differs"
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected)), f"{what}: -Inf pattern differs"
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_prompt_mlp_keeps_nonfinite_values(bad, splits):
    """Also with the backward's loop over the output features split (the interpreter's blocks
    are 32 wide: 72 features make 3 chunks), where NaN and Inf reach the input gradient through
    the partial sums."""
    layers = make_head((20, 72, 72, 20), seed=11)
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(12))
    x[2, 5] = bad  # one virtual token's embedding diverged
    x = x.requires_grad_()
    upstream = torch.randn(6, 20, generator=torch.Generator().manual_seed(13))
    with backward_splits(splits):
        got, got_grads = run(lambda x, layers: ops_prompt_mlp.prompt_mlp_triton(x, layers), x, layers, upstream)
    ref, ref_grads = run(prompt_mlp_reference, x, layers, upstream)
    assert not torch.isfinite(ref).all()  # the case tests something
    assert_same_nonfinite_pattern(got, ref, "output")
    for i, (g, r) in enumerate(zip(got_grads, ref_grads)):
        assert_same_nonfinite_pattern(g, r, f"gradient {i}")


@pytest.mark.parametrize("splits", [1, 2])
def test_prompt_mlp_keeps_a_nan_weight(splits):
    layers = make_head((20, 72, 20), seed=14)
    with torch.no_grad():
        layers[0][0][7, 3] = float("nan")  # one hidden unit NaN for every row: ReLU must not hide it
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(15)).requires_grad_()
    upstream = torch.randn(4, 20, generator=torch.Generator().manual_seed(16))
    with backward_splits(splits):
        got, got_grads = run(lambda x, layers: ops_prompt_mlp.prompt_mlp_triton(x, layers), x, layers, upstream)
    ref, ref_grads = run(prompt_mlp_reference, x, layers, upstream)
    assert torch.isnan(ref).all()
    assert_same_nonfinite_pattern(got, ref, "output")
    for i, (g, r) in enumerate(zip(got_grads, ref_grads)):
        assert_same_nonfinite_pattern(g, r, f"gradient {i}")


@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_prefix_kv_keeps_nonfinite_values(projected, bad):
    weights = [make_weights(4, projected, seed=17), make_weights(3, projected, seed=18)]
    with torch.no_grad():
        weights[0][0][1, 2] = bad
    index = torch.tensor([0, 1, 0])
    with use_backend("triton"):
        got = prefix_kv(weights, index, num_layers=SMALL.L, num_kv_heads=SMALL.HKV, head_dim=SMALL.DH,
                        dtype=torch.float32)
    ref = reference_op(weights, index, torch.float32)
    assert torch.isfinite(ref).all() == (projected and bad == float("inf"))  # tanh(inf) = 1: finite again
    assert_same_nonfinite_pattern(got, ref, "output")
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(19))
    for name, g, r in zip(range(len(params(weights))), grads_of(got, weights, upstream),
                          grads_of(ref, weights, upstream)):
        assert_same_nonfinite_pattern(g, r, f"gradient {name}")
