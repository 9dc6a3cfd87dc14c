"""The fused 4D mask is an optimisation held per architecture: on every model type that takes it
(:data:`ptuning_fast.hf.introspection.FUSED_MASK_MODEL_TYPES`), a native forward with masked
columns (padding, prompts of several lengths) gives the numbers of the same forward handing the
model the 2D mask; every type of the allow-list is built here; the others never get it."""
import warnings

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig
from tests.tiny_models import randomize_

from ptuning_fast import get_ptuning_model
from ptuning_fast.hf.introspection import FUSED_MASK_MODEL_TYPES, takes_fused_mask
from ptuning_fast.native import forward as native_forward

from .architectures import ARCHITECTURES, PROMPT_CONFIG_FIELDS, VOCAB, build_base, pad_token_of, task_of

TAKING = [name for name in ARCHITECTURES if takes_fused_mask(build_base(name))]


def test_every_allowed_type_is_held_here_and_the_others_never_take_it():
    assert {build_base(name).config.model_type for name in TAKING} == FUSED_MASK_MODEL_TYPES
    for name in ("opt", "bloom", "deberta_v2", "distilbert", "mistral", "gemma2", "t5", "bart"):
        assert not takes_fused_mask(build_base(name)), name


def _mixed_lengths_model(name, kind):
    """The native model with two adapters of 3 and 5 virtual tokens."""
    fields = dict(task_type=task_of(name), **PROMPT_CONFIG_FIELDS.get(name, {}))
    make = (lambda n: PromptEncoderConfig(num_virtual_tokens=n, encoder_hidden_size=20, **fields)) if kind == "v1" \
        else (lambda n: PrefixTuningConfig(num_virtual_tokens=n, **fields))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_ptuning_model(build_base(name), make(3), adapter_name="short")
        model.add_adapter("long", make(5))
    randomize_(model.prompt_encoder, 5)
    return model


# Falcon's multi-query attention keeps one KV head where PEFT's prefix has one per query head:
# deep prompts are refused there, by PEFT and here alike (tests/models/test_matrix.py).
CELLS = [(name, kind) for name in TAKING for kind in ("v1", "deep") if (name, kind) != ("falcon", "deep")]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name, kind", CELLS)
def test_fused_mask_equals_the_models_own(monkeypatch, name, kind, side):
    model = _mixed_lengths_model(name, kind)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, :2], mask[2, :4] = 0, 0
    else:
        mask[1, 4:], mask[2, 2:] = 0, 0
    ids = ids.masked_fill(mask == 0, pad_token_of(name))
    inputs = dict(input_ids=ids, attention_mask=mask, adapter_names=["short", "long", "short"])
    seen = []
    build = native_forward.build_prompt_attention_mask
    monkeypatch.setattr(native_forward, "build_prompt_attention_mask",
                        lambda *a, **k: seen.append(1) or build(*a, **k))
    fused = model(**inputs).logits
    assert seen, "the fused mask was not used"
    monkeypatch.setattr(native_forward, "takes_fused_mask", lambda model: False)
    own = model(**inputs).logits
    if fused.dim() == 3:  # per-token outputs: padding columns mean nothing
        fused, own = fused[mask.bool()], own[mask.bool()]
    torch.testing.assert_close(fused, own, rtol=1e-5, atol=1e-5)
