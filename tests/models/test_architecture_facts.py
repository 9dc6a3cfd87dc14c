"""What the package reads off an architecture's class and config: decoder-only or not, where its
positions start, whether it takes a KV cache (deep prompts are refused up front where not)."""
import pytest
import torch
import transformers

import ptuning_fast
from ptuning_fast import PrefixEncoder, get_ptuning_model
from ptuning_fast.hf.introspection import first_position, is_decoder_only, learned_position_limit
from tests.tiny_models import LlamaWithoutPositionIds, llama

from .architectures import ARCHITECTURES, DECODER_HEADS, VOCAB, build_base, task_of
from .test_matrix import _config, inputs_for, twins


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_decoder_only_comes_from_the_class_and_config(name):
    assert is_decoder_only(build_base(name)) == (task_of(name) == "CAUSAL_LM" or name in DECODER_HEADS)


def test_decoder_only_for_decoders_of_encoder_types_and_subclasses():
    bert_decoder = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=44, is_decoder=True)
    assert is_decoder_only(transformers.BertLMHeadModel(bert_decoder))
    bert_decoder.is_decoder = False
    assert not is_decoder_only(transformers.BertModel(bert_decoder))
    assert is_decoder_only(llama(LlamaWithoutPositionIds))  # a subclass of a causal LM


@pytest.mark.parametrize("name, first", [("roberta", 2), ("xlm_roberta", 2), ("bert", 0), ("gpt2", 0), ("llama", 0)])
def test_positions_start_where_the_model_numbers_them(name, first):
    model = build_base(name)
    assert first_position(model) == first
    table = model.base_model.embeddings.position_embeddings if first or name == "bert" else None
    if table is not None:  # positions usable from the first one on
        assert learned_position_limit(model) == table.num_embeddings - first


@pytest.mark.parametrize("name", ["distilbert", "deberta_v2"])
def test_deep_prompts_are_refused_before_the_model_runs(name):
    calls = []
    model_type = build_base(name).config.model_type
    with pytest.raises(ValueError, match=f"{model_type}.*past key values"):
        get_ptuning_model(build_base(name), _config(name, "PREFIX_TUNING"))

    fast = twins(name, "PREFIX_TUNING")[1]
    handle = fast.get_base_model().register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=f"{model_type}.*past key values"):
            fast(**inputs_for(name, seed=3, padded=False))
    finally:
        handle.remove()
    assert not calls

    encoder = PrefixEncoder(fast.peft_config["default"])
    with pytest.raises(ValueError, match=f"{model_type}.*past key values"):
        ptuning_fast.prefix_forward(build_base(name), encoder, torch.randint(3, VOCAB, (2, 4)))
