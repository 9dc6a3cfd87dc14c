"""What SDPA receives: the ``attn_mask`` and ``is_causal`` of every attention call, recorded for
plain PEFT and the accelerated route on the same batch. Where PEFT's path hands SDPA no mask
(an unpadded v1 prompt), so does this package (PyTorch may then pick its flash kernel); where a
mask is needed (padding, a prefix in the cache), both hand the same one."""
import pytest
import torch

from ptuning_fast import get_ptuning_model

from .architectures import ARCHITECTURES, build_base

# Every architecture of the matrix whose attention runs through SDPA
SDPA_MODELS = [name for name in ARCHITECTURES if build_base(name).config._attn_implementation == "sdpa"]
from .test_matrix import _config, _peft_or_refusal, inputs_for, twins


class SdpaRecorder:
    """Records (attn_mask, is_causal) of each ``torch.nn.functional.scaled_dot_product_attention`` call."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = torch.nn.functional.scaled_dot_product_attention

        def record(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
            self.calls.append((None if attn_mask is None else attn_mask.clone(), bool(is_causal)))
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record)

    def take(self, model, inputs):
        self.calls = []
        with torch.no_grad():
            model(**inputs)
        return self.calls


def _as_bool(mask):
    return mask if mask.dtype == torch.bool else mask == 0


def _inputs(name, case):
    inputs = inputs_for(name, seed=17, padded=case == "padded")
    if case == "no mask":
        del inputs["attention_mask"]
    return inputs


# Plain PEFT fails on these (the matrix checks this package's refusal there)
PEFT_FAILS = {("falcon", "PREFIX_TUNING"), ("distilbert", "PREFIX_TUNING")}


@pytest.mark.peft_oracle
@pytest.mark.parametrize("case", ["no mask", "all-ones mask", "padded"])
@pytest.mark.parametrize("name, kind", [(name, kind) for name in SDPA_MODELS for kind in ("P_TUNING", "PREFIX_TUNING")
                                        if (name, kind) not in PEFT_FAILS])
def test_sdpa_gets_what_peft_gives_it(request, monkeypatch, name, kind, case):
    peft, fast = twins(name, kind)
    recorder = SdpaRecorder(monkeypatch)
    inputs = _inputs(name, case)
    expected = _peft_or_refusal(request, lambda: recorder.take(peft, inputs))
    assert expected is not None, request.node.user_properties
    got = recorder.take(fast, inputs)
    assert len(got) == len(expected) >= 2  # one call per attention layer
    for (mask, causal), (ref_mask, ref_causal) in zip(got, expected):
        assert (mask is None) == (ref_mask is None) and causal == ref_causal
        if mask is not None:
            assert torch.equal(_as_bool(mask).expand_as(ref_mask), _as_bool(ref_mask))
    if kind == "P_TUNING" and case != "padded" and name in ("llama", "gpt2", "bert"):
        assert all(mask is None for mask, _ in got)  # PEFT's unpadded v1 path: no mask at all (fast kernels)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_native_unpadded_v1_hands_no_mask(monkeypatch, name):
    model = get_ptuning_model(build_base(name), _config(name, "P_TUNING"))
    recorder = SdpaRecorder(monkeypatch)
    calls = recorder.take(model, _inputs(name, "no mask"))
    assert calls and all(mask is None and causal == (name == "llama") for mask, causal in calls)
