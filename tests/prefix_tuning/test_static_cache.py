"""Deep prompts and ``generate(cache_implementation=...)``: their prefix lives in a PrefixKVCache
(a dynamic cache written in place), so a request for a static cache is refused with a clear error
naming it, never silently served by a dynamic cache."""
import pytest
import torch

from tests.compile.paths import batch, build


@pytest.mark.parametrize("route", ["accelerated", "native"])
def test_static_cache_is_refused_by_name_for_deep_prompts(route):
    model = build("deep", route)
    input_ids, attention_mask = batch()
    settings = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2, do_sample=False,
                    pad_token_id=0)
    with pytest.raises(ValueError, match=r"cache_implementation='static'.*PREFIX_TUNING"):
        model.generate(**settings, cache_implementation="static")
    dynamic = model.generate(**settings, cache_implementation="dynamic")
    torch.testing.assert_close(dynamic, model.generate(**settings))  # "dynamic" is what runs by default


def test_v1_prompts_generate_with_a_static_cache_as_with_a_dynamic_one():
    model = build("v1", "native")
    input_ids, attention_mask = batch()
    settings = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False,
                    pad_token_id=0)
    torch.testing.assert_close(model.generate(**settings, cache_implementation="static"), model.generate(**settings))
