"""The drop-in PromptEncoder against PEFT's: weights, state_dict, outputs, gradients, cache, errors."""
import warnings

import pytest
import torch
from peft import PromptEncoderConfig as PeftConfig
from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder

from ptuning_fast import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from ptuning_fast.reference import prompt_mlp_reference
from tests.p_tuning import configs

T, D, H = 7, 24, 20  # odd sizes on purpose
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7: one bf16 ulp of a value of magnitude 1


def make_config(kind="MLP", submodules=1, **kw):
    return configs.make_config(T, D, H, kind, submodules, **kw)


def make_pair(config, seed=0):
    torch.manual_seed(seed)
    peft_enc = PeftPromptEncoder(config)
    torch.manual_seed(seed)
    ours = PromptEncoder(config)
    return peft_enc, ours


def randomize_(module, seed):
    """Fresh random weights (not the init): every parameter gets a new normal draw."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.5)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("submodules", [1, 2])
def test_same_init_and_state_dict_keys(kind, submodules):
    peft_enc, ours = make_pair(make_config(kind, submodules), seed=123)
    assert isinstance(ours, PeftPromptEncoder)
    ref, got = peft_enc.state_dict(), ours.state_dict()
    assert list(ref) == list(got)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    expected = {"embedding.weight", "mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.2.weight", "mlp_head.2.bias"}
    assert expected <= set(got)
    if kind == "MLP":
        assert {"mlp_head.4.weight", "mlp_head.4.bias"} <= set(got)
    else:
        assert any(k.startswith("lstm_head.") for k in got)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("submodules", [1, 2])
def test_state_dict_loads_both_ways_strict(kind, submodules):
    peft_enc, ours = make_pair(make_config(kind, submodules), seed=1)
    randomize_(peft_enc, 11)
    ours.load_state_dict(peft_enc.state_dict(), strict=True)
    randomize_(ours, 12)
    peft_enc.load_state_dict(ours.state_dict(), strict=True)
    for (k, a), (_, b) in zip(peft_enc.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), k


def _indices(kind_of_rows, total, batch):
    if kind_of_rows == "expanded":  # what PeftModel passes: one arange row expanded over the batch
        return torch.arange(total).unsqueeze(0).expand(batch, -1)
    if kind_of_rows == "contiguous":
        return torch.arange(total).repeat(batch, 1)
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, total, (batch, total), generator=g)


def _forward_backward(module, indices, upstream):
    module.zero_grad(set_to_none=True)
    out = module(indices)
    (out.float() * upstream).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("submodules", [1, 2])
@pytest.mark.parametrize("rows", ["expanded", "contiguous", "random"])
def test_forward_and_gradients_match_peft_fp32(kind, submodules, rows):
    peft_enc, ours = make_pair(make_config(kind, submodules))
    randomize_(peft_enc, 3)
    ours.load_state_dict(peft_enc.state_dict())
    total = T * submodules
    indices = _indices(rows, total, batch=3)
    upstream = torch.randn(3, total, D)
    ref_out, ref_grads = _forward_backward(peft_enc, indices, upstream)
    out, grads = _forward_backward(ours, indices, upstream)
    assert out.shape == ref_out.shape == (3, total, D)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("submodules", [1, 2])
def test_bf16_parameters_within_pytorch_error(kind, submodules):
    """bf16 weights: our error vs an fp64 oracle is at most 2x PEFT's own bf16 error, in the output
    and in every parameter gradient, where the gradients may also carry one more bf16 rounding
    (one ulp at the gradient's scale, eps * max|grad|): we encode the T tokens once and broadcast
    them, so the batch's gradient is summed (and rounded to bf16) before the head, where PEFT
    sums it inside each product."""
    config = make_config(kind, submodules)
    peft_enc, ours = make_pair(config)
    randomize_(peft_enc, 4)
    oracle = PeftPromptEncoder(config).double()
    oracle.load_state_dict(peft_enc.state_dict())
    peft_enc.to(torch.bfloat16)
    ours.load_state_dict(peft_enc.state_dict())
    ours.to(torch.bfloat16)
    idx = _indices("expanded", T * submodules, 2)
    probe = torch.randn(2, T * submodules, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def run(encoder):
        out = encoder(idx)
        encoder.zero_grad(set_to_none=True)
        (out.double() * probe).sum().backward()
        return out, {n: p.grad.double() for n, p in encoder.named_parameters()}

    exact, exact_grads = run(oracle)
    peft_out, peft_grads = run(peft_enc)
    our_out, our_grads = run(ours)
    assert our_out.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.bfloat16 for p in ours.parameters())
    peft_err = (peft_out.double() - exact).abs().max().item()
    assert (our_out.double() - exact).abs().max().item() <= 2 * peft_err + 1e-6
    assert set(our_grads) == set(exact_grads)
    for name, exact_grad in exact_grads.items():
        peft_err = (peft_grads[name] - exact_grad).abs().max().item()
        our_err = (our_grads[name] - exact_grad).abs().max().item()
        assert our_err <= 2 * peft_err + BF16_EPS * exact_grad.abs().max().item(), name


def test_autocast_bf16_matches_peft():
    peft_enc, ours = make_pair(make_config("MLP"))
    randomize_(peft_enc, 6)
    ours.load_state_dict(peft_enc.state_dict())
    idx = _indices("expanded", T, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, got = peft_enc(idx), ours(idx)
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_expanded_indices_broadcast_without_copies():
    _, ours = make_pair(make_config("MLP"))
    out = ours(_indices("expanded", T, 16))
    assert out.shape == (16, T, D) and out.stride(0) == 0  # one encoded prompt, viewed 16 times


def test_inference_mode_is_embedding_only():
    config = make_config("MLP", inference_mode=True)
    peft_enc, ours = make_pair(config)
    assert not hasattr(ours, "mlp_head") and ours.inference_mode
    assert list(ours.state_dict()) == list(peft_enc.state_dict()) == ["embedding.weight"]
    idx = _indices("random", T, 2)
    torch.testing.assert_close(ours(idx), ours.embedding.weight[idx], rtol=0, atol=0)


def test_reference_mlp_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    layers = []
    for i, o in [(5, 4), (4, 4), (4, 6)]:
        w = torch.randn(o, i, dtype=torch.float64, generator=g, requires_grad=True)
        b = torch.randn(o, dtype=torch.float64, generator=g, requires_grad=True)
        layers.append((w, b))
    flat = [x] + [t for layer in layers for t in layer]

    def fn(x, *params):
        return prompt_mlp_reference(x, [(params[i], params[i + 1]) for i in range(0, len(params), 2)])

    assert torch.autograd.gradcheck(fn, tuple(flat))


# ----------------------------------------------------------------------------- never stale
@pytest.mark.parametrize("change", ["fused_adamw", "data_write"])
def test_eval_reflects_every_parameter_change(change):
    """No encoded prompt outlives the weights it came from: a fused optimizer step and a ``.data``
    write change no version counter, and the next eval call must still see them."""
    _, ours = make_pair(make_config("MLP"))
    idx = _indices("expanded", T, 4)
    ours.eval()
    with torch.no_grad():
        before = ours(idx).clone()
    if change == "fused_adamw":
        optimizer = torch.optim.AdamW(ours.parameters(), lr=0.1, fused=True)
        ours.train()
        ours(idx).pow(2).sum().backward()
        optimizer.step()
        ours.eval()
    else:
        for p in ours.parameters():
            p.data.add_(0.25)
    with torch.no_grad():
        after = ours(idx)
        fresh = PromptEncoder(make_config("MLP"))
        fresh.load_state_dict(ours.state_dict())
        torch.testing.assert_close(after, fresh(idx), rtol=0, atol=0)
    assert not torch.equal(after, before)


def test_cache_invalidated_by_load_state_dict_and_not_used_with_grad():
    _, ours = make_pair(make_config("MLP"))
    idx = _indices("expanded", T, 2)
    with torch.no_grad():
        before = ours(idx).clone()
    other = PromptEncoder(make_config("MLP"))
    randomize_(other, 9)
    ours.load_state_dict(other.state_dict())
    with torch.no_grad():
        after = ours(idx)
    torch.testing.assert_close(after, other(idx).detach(), rtol=0, atol=0)
    assert not torch.equal(before, after)
    assert ours(idx).requires_grad  # grad mode: a fresh graph, never the cached tensor


# ----------------------------------------------------------------------------- config and errors
def test_accepts_our_config_peft_config_and_string_type():
    ours_cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=T, token_dim=D, encoder_hidden_size=H,
                                   num_transformer_submodules=1, encoder_reparameterization_type="LSTM")
    assert isinstance(ours_cfg, PeftConfig)
    assert ours_cfg.encoder_reparameterization_type is PromptEncoderReparameterizationType.LSTM
    assert PromptEncoder(ours_cfg).encoder_type is PromptEncoderReparameterizationType.LSTM
    assert PromptEncoderConfig.from_peft(make_config("MLP")).token_dim == D


def test_mlp_layers_warning_text_and_string_type_does_not_crash():
    # PEFT needs the enum here: with the string "MLP" it crashes building the warning text.
    config = make_config(PromptEncoderReparameterizationType.MLP, encoder_num_layers=3)
    with pytest.warns(UserWarning) as record:
        PeftPromptEncoder(config)
    with pytest.warns(UserWarning) as ours_record:
        PromptEncoder(config)
    expected = "for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used."
    assert str(record[0].message) == str(ours_record[0].message) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PromptEncoder(make_config("MLP", encoder_num_layers=3))  # PEFT's str-type crash is not copied


def test_unknown_encoder_type_error_text():
    with pytest.raises(ValueError, match="Prompt encoder type not recognized. Please use one of MLP"):
        PromptEncoder(make_config("GRU"))
    with pytest.raises(ValueError, match="Prompt encoder type not recognized"):
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=4, encoder_reparameterization_type="GRU")


@pytest.mark.parametrize("field,value,error,message", [
    ("encoder_hidden_size", None, TypeError, "`encoder_hidden_size` must be an int, got None"),
    ("token_dim", None, TypeError, "`token_dim` must be an int"),
    ("num_virtual_tokens", 0, ValueError, "`num_virtual_tokens` must be > 0"),
    ("num_transformer_submodules", None, TypeError, "`num_transformer_submodules` must be an int"),
])
def test_bad_config_errors(field, value, error, message):
    with pytest.raises(error, match=message):
        PromptEncoder(make_config("MLP", **{field: value}))
    with pytest.raises(TypeError, match="`config` must be a PromptEncoderConfig"):
        PromptEncoder(42)


@pytest.mark.parametrize("indices,error,message", [
    (torch.zeros(2, T), TypeError, "`indices` must have dtype in"),
    (torch.arange(T), ValueError, "`indices` must have 2 dimensions"),
    (torch.zeros(1, 2, T, dtype=torch.long), ValueError, "`indices` must have 2 dimensions"),
    (torch.full((2, T), T), ValueError, r"`indices` holds indices outside \[0, 7\)"),
    (torch.full((2, T), -1), ValueError, r"`indices` holds indices outside \[0, 7\)"),
    (torch.zeros(2, T, dtype=torch.long, device="meta"), ValueError, "`indices` is on meta but must be on cpu"),
    ([[0, 1]], TypeError, "`indices` must be a torch.Tensor"),
])
def test_bad_indices_errors(indices, error, message):
    _, ours = make_pair(make_config("MLP"))
    with pytest.raises(error, match=message):
        ours(indices)


def test_the_other_methods_config_is_refused_by_name():
    from ptuning_fast import PrefixTuningConfig

    with pytest.raises(TypeError, match="`config` is a PrefixTuningConfig \\(PREFIX_TUNING\\), but PromptEncoder "
                                        "needs a PromptEncoderConfig \\(P_TUNING\\)"):
        PromptEncoder(PrefixTuningConfig(num_virtual_tokens=3, token_dim=8, num_layers=2))
