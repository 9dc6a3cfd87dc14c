"""``torch.compile(fullgraph=True)`` of one decode step after a prefill, for the accelerated and
the native model: deep prompts decode over the package's prefix cache (``PrefixKVCache``, the cache
``generate()`` runs on), v1 prompts over the model's own cache after the prompt's prefill. The
compiled step must give eager's logits and leave the cache as eager leaves it (the next step reads
it)."""
import pytest
import torch

from ptuning_fast.hf.compat import CACHE_KWARG
from ptuning_fast.native.adapters import prefix_weights, resolve_rows
from ptuning_fast.native.forward import layout_batch
from ptuning_fast.prefix_tuning.cache import PrefixKVCache
from ptuning_fast.prefix_tuning.functional import prefix_attention_mask, prefix_cache_for
from tests.compile.paths import KINDS, ROUTES, batch, build


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _holder(model):
    """The object holding the adapters: the native model, or the accelerated PeftModel's."""
    from ptuning_fast.peft_route import _ATTRIBUTE

    return model.__dict__.get(_ATTRIBUTE, model)


def _prefill(model, kind, input_ids, attention_mask):
    """(base model, cache after the prefill, the mask and positions a decode step continues
    from), as the package's generate() lays them out."""
    holder = _holder(model)
    base = holder.base_model
    rows = resolve_rows(holder, None, input_ids.shape[0], input_ids.device)
    layout, prefix, inputs = layout_batch(holder, rows, input_ids, attention_mask, None, None, pad_left=True)
    if kind == "v1":
        mask, cache = layout.attention_mask, None
    else:
        mask = prefix_attention_mask(layout.attention_mask, prefix)
        cache = prefix_cache_for(base, prefix_weights(holder, rows), rows.index, input_ids.shape[0],
                                 seq_len=layout.width, max_new_tokens=1)
    with torch.no_grad():
        out = base(**inputs, attention_mask=mask, position_ids=layout.position_ids, use_cache=True,
                   **({} if cache is None else {CACHE_KWARG: cache}))
    return base, out.past_key_values, mask, layout.position_ids


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_decode_step_equals_eager(kind, route):
    model = build(kind, route)
    model.eval()
    input_ids, attention_mask = batch()
    new_token = torch.randint(3, 50, (input_ids.shape[0], 1), generator=torch.Generator().manual_seed(5))
    results = []
    for compiled in (False, True):
        base, cache, mask, positions = _prefill(model, kind, input_ids, attention_mask)
        assert isinstance(cache, PrefixKVCache) == (kind == "deep")
        step = torch.compile(base, fullgraph=True, backend="aot_eager") if compiled else base
        with torch.no_grad():
            out = step(input_ids=new_token, attention_mask=torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1),
                       position_ids=None if positions is None else positions[:, -1:] + 1,  # None: the model's own
                       use_cache=True, **{CACHE_KWARG: cache})
        layer = out.past_key_values.layers[0]
        results.append((out.logits, layer.keys.clone(), layer.values.clone()))
    (logits, keys, values), (compiled_logits, compiled_keys, compiled_values) = results
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_keys, keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_values, values, rtol=1e-5, atol=1e-5)
    assert logits.abs().sum() > 0
