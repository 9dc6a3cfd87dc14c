"""``PrefixEncoder``: the drop-in for PEFT's prefix-tuning encoder (same init, keys, outputs, errors)."""
import pytest
import torch
from peft import PrefixTuningConfig as PeftPrefixTuningConfig
from peft.tuners.prefix_tuning import PrefixEncoder as PeftPrefixEncoder

from ptuning_fast import PrefixEncoder, PrefixTuningConfig, PromptEncoderConfig

L, HKV, DH, HH = 2, 3, 5, 11
J = L * 2 * HKV * DH


def peft_config(projection, **kw):
    base = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=HKV * DH, num_layers=L,
                num_attention_heads=HKV, encoder_hidden_size=HH, prefix_projection=projection)
    base.update(kw)
    return PeftPrefixTuningConfig(**base)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("init_weights", [None, "zero"])
def test_encoder_same_init_state_dict_and_outputs_as_peft(projection, init_weights):
    config = peft_config(projection, init_weights=init_weights)
    torch.manual_seed(7)
    theirs = PeftPrefixEncoder(config)
    torch.manual_seed(7)
    ours = PrefixEncoder(config)
    assert isinstance(ours, PeftPrefixEncoder)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    expected = {"embedding.weight"} | ({"transform.0.weight", "transform.0.bias", "transform.2.weight",
                                         "transform.2.bias"} if projection else set())
    assert set(ours.state_dict()) == expected
    if init_weights is None:
        prefix = torch.arange(5).unsqueeze(0).expand(3, -1)
        torch.testing.assert_close(ours(prefix), theirs(prefix), rtol=1e-6, atol=1e-6)
        mixed = torch.tensor([[4, 0, 2], [1, 1, 3]])
        torch.testing.assert_close(ours(mixed), theirs(mixed), rtol=1e-6, atol=1e-6)


def test_encoder_prefix_weights_are_the_parameters():
    ours = PrefixEncoder(peft_config(True))
    w = ours.prefix_weights()
    assert w.projected and w.w2 is ours.transform[2].weight  # the parameters themselves, in any mode
    ours.eval()
    with torch.no_grad():
        a = ours.encoded_prefix().clone()
        assert ours.prefix_weights().w2 is ours.transform[2].weight
        ours.transform[2].bias.data.add_(1.0)  # no version bump: the next call still sees it
        c = ours.encoded_prefix()
    torch.testing.assert_close(c, a + 1.0)
    # inference_mode + projection (a saved PEFT adapter): the embedding is the prefix; PEFT's forward crashes
    loaded = PrefixEncoder(peft_config(True, inference_mode=True))
    assert not loaded.projected and loaded.embedding.weight.shape == (5, J)
    assert loaded(torch.arange(5).unsqueeze(0)).shape == (1, 5, J)


def test_config_and_encoder_errors():
    with pytest.raises(ValueError, match='`init_weights` must be None'):
        PrefixTuningConfig(num_virtual_tokens=3, init_weights="zeros")
    ours = PrefixTuningConfig.from_peft(peft_config(True))
    assert isinstance(ours, PeftPrefixTuningConfig) and ours.encoder_hidden_size == HH
    with pytest.raises(TypeError, match="`token_dim` must be an int, got None"):
        PrefixEncoder(peft_config(False, token_dim=None))
    with pytest.raises(TypeError, match="`encoder_hidden_size` must be an int, got None"):
        PrefixEncoder(peft_config(True, encoder_hidden_size=None))
    with pytest.raises(ValueError, match="`token_dim` .* must be a multiple of `num_attention_heads`"):
        PrefixEncoder(peft_config(False, num_attention_heads=4))
    with pytest.raises(TypeError, match="`config` must be a PrefixTuningConfig"):
        PrefixEncoder(object())
    enc = PrefixEncoder(peft_config(False))
    with pytest.raises(ValueError, match=r"`prefix` holds indices outside \[0, 5\)"):
        enc(torch.tensor([[0, 5]]))
    with pytest.raises(TypeError, match="`prefix` must have dtype"):
        enc(torch.zeros(1, 2))
    with pytest.raises(TypeError, match="`config` is a PromptEncoderConfig \\(P_TUNING\\), but PrefixEncoder needs a "
                                        "PrefixTuningConfig \\(PREFIX_TUNING\\)"):
        PrefixEncoder(PromptEncoderConfig(num_virtual_tokens=3, token_dim=8, encoder_hidden_size=8))
