"""Two-stage training (``--head-steps N``): the classifier head alone for N steps, the prompt
encoder frozen (bit for bit, and no optimizer state for it), then both; across a resume too."""
import pytest
import torch
from safetensors.torch import load_file
from tests.train.tiny import tiny_config, trainable_state

from ptuning_fast import train
from ptuning_fast.train import TrainConfig
from ptuning_fast.train.job import Job
from ptuning_fast.train.model import is_prompt_parameter


def _split(state: dict) -> tuple[dict, dict]:
    prompts = {k: v for k, v in state.items() if is_prompt_parameter(k)}
    head = {k: v for k, v in state.items() if not is_prompt_parameter(k)}
    assert prompts and head
    return prompts, head


def _changed(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("prompt", ["v1", "v2"])
def test_the_head_trains_alone_first(tiny_bert, small_data, prompt):
    data, eval_data = small_data
    job = Job(tiny_config(tiny_bert, data=data, eval_data=eval_data, prompt=prompt, steps=4, head_steps=2))
    prompts0, head0 = _split(trainable_state(job.peft_model))
    prompt_params = {id(p) for n, p in train.trainable_parameters(job.peft_model).items() if is_prompt_parameter(n)}
    for step in (0, 1):
        job.train_step(step)
        prompts, head = _split(trainable_state(job.peft_model))
        assert not _changed(prompts0, prompts), f"prompts moved at step {step + 1}"
        assert _changed(head0, head) == set(head0), f"the head did not train at step {step + 1}"
        assert not any(id(p) in prompt_params for p in job.optimizer.state)  # no state advanced for the prompts
    job.train_step(2)
    prompts, head = _split(trainable_state(job.peft_model))
    assert _changed(prompts0, prompts) == set(prompts0) and _changed(head0, head) == set(head0)
    assert all(id(p) in {id(q) for q in job.optimizer.state} for p in job.prompt_params)


def test_head_steps_survive_a_resume(tiny_bert, small_data, tmp_path):
    data, eval_data = small_data
    common = dict(data=data, eval_data=eval_data, steps=4, head_steps=2, save_every=1, output_dir=str(tmp_path))
    straight = trainable_state(train.run(tiny_config(tiny_bert, **common)).model)
    prompts_at = {step: _split(load_file(tmp_path / f"checkpoint-{step}" / train.TRAINABLE_FILE))[0]
                  for step in (1, 2, 3)}
    assert not _changed(prompts_at[1], prompts_at[2]) and _changed(prompts_at[2], prompts_at[3])
    for name in ("checkpoint-2", "checkpoint-3", "checkpoint-4"):  # resume inside the head-only stage
        (tmp_path / name).rename(tmp_path / f"moved-{name}")
    resumed = train.run(tiny_config(tiny_bert, resume="latest", **common))
    assert resumed.summary["resumed_from_step"] == 1 and resumed.summary["head_steps"] == 2
    assert not _changed(prompts_at[1], _split(load_file(tmp_path / "checkpoint-2" / train.TRAINABLE_FILE))[0])
    got = trainable_state(resumed.model)
    assert got.keys() == straight.keys() and not _changed(straight, got)
    with pytest.raises(ValueError, match=r"different options: head_steps=2 \(now 0\)"):
        train.run(tiny_config(tiny_bert, resume="latest", **{**common, "head_steps": 0}))


def test_head_steps_errors(tiny_bert, small_data):
    data, eval_data = small_data
    with pytest.raises(ValueError, match=r"`head_steps` \(3\) must be fewer than the job's 3 steps"):
        train.run(tiny_config(tiny_bert, data=data, eval_data=eval_data, steps=3, head_steps=3))
    with pytest.raises(ValueError, match=r"`head_steps` \(1\) needs a task head.*'causal-lm' has none"):
        TrainConfig(task="causal-lm", head_steps=1)
    with pytest.raises(ValueError, match="`head_steps` must be >= 0"):
        train.parse_args(["--head-steps", "-1"])
    assert train.parse_args(["--head-steps", "5"]).head_steps == 5 and TrainConfig().head_steps == 0
