"""Sizes are bounded before anything is allocated: a config, an adapter_config.json or a mask
call asking for 10**9 virtual tokens (or widths, or layers) fails in a line, naming the field and
its limit, instead of allocating hundreds of GB or hanging."""
import json
import time

import pytest
import torch
from peft import PromptEncoderConfig as PeftPromptEncoderConfig
from tests.tiny_models import build, prompt_configs

import ptuning_fast
from ptuning_fast import PrefixTuningConfig, PromptEncoderConfig, get_ptuning_model, load_adapter
from ptuning_fast.config import SIZE_LIMITS
from ptuning_fast.ops.mask import MAX_PROMPT_LENGTH

KINDS = prompt_configs(4)
HUGE = 10**9


@pytest.mark.parametrize("field", ["num_virtual_tokens", "token_dim", "encoder_hidden_size", "encoder_num_layers"])
def test_config_sizes_over_the_limits_are_refused(field):
    start = time.perf_counter()
    sizes = {"num_virtual_tokens": 4, field: HUGE}
    with pytest.raises(ValueError, match=f"`{field}` \\({HUGE}\\) is over the limit of {SIZE_LIMITS[field]}"):
        PromptEncoderConfig(task_type="CAUSAL_LM", **sizes)
    with pytest.raises(ValueError, match=f"`{field}` \\({HUGE}\\) is over the limit"):  # PEFT's config, when used
        get_ptuning_model(build("llama")[0], PeftPromptEncoderConfig(task_type="CAUSAL_LM", **sizes))
    assert time.perf_counter() - start < 10
    PromptEncoderConfig(task_type="CAUSAL_LM", **{**sizes, field: SIZE_LIMITS[field]})  # the limit itself is in


def test_prefix_config_sizes_are_refused():
    with pytest.raises(ValueError, match="`num_layers` \\(100000\\) is over the limit of 1024"):
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_layers=100_000)
    with pytest.raises(ValueError, match="`encoder_hidden_size` .* over the limit"):
        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                           encoder_hidden_size=HUGE)


@pytest.mark.parametrize("field", ["num_virtual_tokens", "encoder_hidden_size", "encoder_num_layers", "token_dim"])
def test_an_adapter_config_json_asking_for_huge_sizes_is_refused_naming_the_file(tmp_path, field):
    get_ptuning_model(build("llama")[0], KINDS["lstm"]("CAUSAL_LM")).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: HUGE}))
    with pytest.raises(ValueError, match=f"adapter_config.json: `{field}` \\({HUGE}\\) is over the limit"):
        load_adapter(build("llama")[0], tmp_path)


def test_v1_prompts_are_bounded_by_the_models_learned_positions(tmp_path):
    base, task = build("gpt2")  # 64 learned positions
    long = get_ptuning_model(base, PromptEncoderConfig(task_type=task, num_virtual_tokens=64, encoder_hidden_size=8))
    long.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_virtual_tokens \\(64\\) leaves no position for text: GPT2LMHeadModel "
                                         "has max_position_embeddings=64"):
        load_adapter(get_ptuning_model(build("gpt2")[0], KINDS["mlp"](task)), tmp_path, adapter_name="long")


def test_mask_builder_refuses_huge_prompt_lengths_before_allocating():
    mask = torch.ones(2, 5, dtype=torch.long)
    for lengths in (2**40, MAX_PROMPT_LENGTH + 1):
        with pytest.raises(ValueError, match=f"`prompt_lengths` \\({lengths}\\) is over the limit of "
                                             f"{MAX_PROMPT_LENGTH} prompt columns"):
            ptuning_fast.build_prompt_attention_mask(mask, lengths)
        with pytest.raises(ValueError, match="`prompt_lengths` .* is over the limit"):
            ptuning_fast.build_prompt_position_ids(mask, lengths)
    near_the_end = torch.tensor([3, 2**63 - 3])  # positions would wrap around int64
    with pytest.raises(ValueError, match=f"`prompt_lengths` \\({2**63 - 3}\\) is over the limit"):
        ptuning_fast.build_prompt_position_ids(mask, near_the_end)
    with pytest.raises(ValueError, match="`num_prompt_columns` .* is over the limit"):
        ptuning_fast.build_prompt_attention_mask(mask, 2, num_prompt_columns=2**40)
    # Within the limit, the builder still works.
    assert ptuning_fast.build_prompt_attention_mask(mask, torch.tensor([3, 1])).shape[-1] == 3 + 5
