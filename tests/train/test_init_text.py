"""``--init-text TEXT``: every prompt adapter of the job starts as the words, before the first
step (v1: the encoded prompts are the words' input embeddings; v2: each layer's prefix keys are
the keys the frozen model computes for the words), for one task or several, with or without
``--baseline peft``; a resumed run keeps its checkpoint's prompts."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tests.train.tiny import tiny_config, trainable_state

from ptuning_fast import train
from ptuning_fast.train import TrainConfig
from ptuning_fast.train.config import build_parser
from ptuning_fast.train.job import Job
from ptuning_fast.train.model import init_prompts, is_prompt_parameter
from ptuning_fast.train.multitask import MultiTaskJob

WORDS = "Sentiment of the review:"


def _word_ids(config: TrainConfig, length: int) -> torch.Tensor:
    ids = train.load_tokenizer(config)(WORDS, add_special_tokens=False)["input_ids"]
    assert 1 < len(ids) < length  # repeated to the prompt length, as PEFT's PROMPT_TUNING text init does
    return torch.tensor((ids * length)[:length])


@torch.no_grad()
def _encoded(model, adapter: str) -> torch.Tensor:
    """The adapter's encoded virtual tokens: v1 (T, hidden); v2 (T, layers * 2 * hidden)."""
    encoder = model.prompt_encoder[adapter]
    training = encoder.training
    encoder.eval()
    tokens = torch.arange(model.peft_config[adapter].num_virtual_tokens)
    out = encoder(tokens[None])[0]
    encoder.train(training)
    return out


@torch.no_grad()
def _v1_similarity(model, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    words = model.get_base_model().get_input_embeddings()(ids)
    return F.cosine_similarity(_encoded(model, adapter), words, dim=-1)


@torch.no_grad()
def _word_keys(base, ids: torch.Tensor) -> torch.Tensor:
    """(layers, heads, T, head_dim): each BERT layer's key projection of its input for the words
    alone at positions 0..T-1, computed from the hidden states (not from a cache)."""
    base.eval()
    hidden = base(input_ids=ids[None], output_hidden_states=True).hidden_states
    keys = []
    for index, layer in enumerate(base.bert.encoder.layer):
        attention = layer.attention.self
        heads = base.config.num_attention_heads
        keys.append(attention.key(hidden[index][0]).view(len(ids), heads, -1).transpose(0, 1))
    return torch.stack(keys)


def _prefix_keys(model, adapter: str) -> torch.Tensor:
    """(layers, heads, T, head_dim) keys of the adapter's deep prompt (PEFT's flat layout per token:
    layer, key/value, head, channel)."""
    base = model.get_base_model()
    layers, heads = base.config.num_hidden_layers, base.config.num_attention_heads
    flat = _encoded(model, adapter)
    return flat.view(flat.shape[0], layers, 2, heads, -1)[:, :, 0].permute(1, 2, 0, 3)


def _assert_v2_is_the_words(model, adapter: str, ids: torch.Tensor) -> None:
    expected = _word_keys(model.get_base_model(), ids)
    got = _prefix_keys(model, adapter)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("baseline,encoder_type", [("none", "MLP"), ("none", "LSTM"), ("peft", "MLP")])
def test_v1_prompts_start_as_the_words(tiny_bert, small_data, baseline, encoder_type):
    data, eval_data = small_data
    options = dict(data=data, eval_data=eval_data, prompt="v1", num_virtual_tokens=7, baseline=baseline,
                   encoder_type=encoder_type)
    job = Job(tiny_config(tiny_bert, init_text=WORDS, **options))
    ids = _word_ids(job.config, 7)
    assert not job.optimizer.state  # set up, no step taken
    assert _v1_similarity(job.peft_model, "default", ids).min() >= 0.999
    result = job.text_init["default"]
    assert result.method == "exact" and result.max_relative_error < 1e-5 and list(result.token_ids) == ids.tolist()
    random_start = Job(tiny_config(tiny_bert, **options))  # the same job without the words is far from them
    assert random_start.text_init is None and _v1_similarity(random_start.peft_model, "default", ids).max() < 0.9


@pytest.mark.parametrize("baseline,projection", [("none", False), ("none", True), ("peft", False)])
def test_v2_prompts_start_as_the_words(tiny_bert, small_data, baseline, projection):
    data, eval_data = small_data
    options = dict(data=data, eval_data=eval_data, prompt="v2", num_virtual_tokens=7, baseline=baseline,
                   prefix_projection=projection)
    job = Job(tiny_config(tiny_bert, init_text=WORDS, **options))
    assert not job.optimizer.state
    _assert_v2_is_the_words(job.peft_model, "default", _word_ids(job.config, 7))
    random_start = Job(tiny_config(tiny_bert, **options))
    with pytest.raises(AssertionError):
        _assert_v2_is_the_words(random_start.peft_model, "default", _word_ids(job.config, 7))


@pytest.mark.parametrize("prompt", ["v1", "v2"])
def test_every_task_adapter_starts_as_the_words(tiny_bert, small_data, prompt):
    data, _ = small_data
    config = tiny_config(tiny_bert, tasks=[f"first={data}", f"second={data}"], prompt=prompt, num_virtual_tokens=6,
                         init_text=WORDS)
    job = MultiTaskJob(config)
    ids = _word_ids(config, 6)
    assert set(job.text_init) == {"first", "second"}
    for adapter in ("first", "second"):
        if prompt == "v1":
            assert _v1_similarity(job.peft_model, adapter, ids).min() >= 0.999
        else:
            _assert_v2_is_the_words(job.peft_model, adapter, ids)


def test_a_resumed_run_keeps_its_checkpoints_prompts(tiny_bert, small_data, tmp_path):
    data, eval_data = small_data
    common = dict(data=data, eval_data=eval_data, steps=3, save_every=1, output_dir=str(tmp_path), init_text=WORDS)
    straight = train.run(tiny_config(tiny_bert, **common))
    assert straight.summary["init_text"] == WORDS
    assert straight.summary["text_init"]["default"]["method"] == "exact"
    for name in ("checkpoint-2", "checkpoint-3"):
        (tmp_path / name).rename(tmp_path / f"moved-{name}")
    resumed_job = Job(tiny_config(tiny_bert, resume="latest", **common))
    at_step_1 = load_file(tmp_path / "checkpoint-1" / train.TRAINABLE_FILE)
    state = trainable_state(resumed_job.peft_model)
    assert resumed_job.text_init is None and any(is_prompt_parameter(name) for name in state)
    for name, value in state.items():  # the checkpoint's prompts, not the words again
        assert torch.equal(value, at_step_1[name]), name
    resumed = train.run(tiny_config(tiny_bert, resume="latest", **common))
    assert resumed.summary["resumed_from_step"] == 1 and resumed.summary["init_text"] == WORDS
    expected, got = trainable_state(straight.model), trainable_state(resumed.model)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    with pytest.raises(ValueError, match=r"different options: init_text='Sentiment of the review:' \(now None\)"):
        train.run(tiny_config(tiny_bert, resume="latest", **{**common, "init_text": None}))


def test_init_text_option_and_errors(tiny_bert, capsys):
    assert train.parse_args(["--init-text", WORDS]).init_text == WORDS and TrainConfig().init_text is None
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "--init-text TEXT start every prompt adapter as these words" in " ".join(capsys.readouterr().out.split())
    assert "--init-text" in build_parser().format_help()
    for blank in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match="`init_text` must hold words"):
            TrainConfig(init_text=blank)
    with pytest.raises(ValueError, match="`init_text` must hold words"):
        train.parse_args(["--init-text", " "])
    with pytest.raises(TypeError, match="`init_text` must be a str or None"):
        TrainConfig(init_text=["Sentiment"])
    with pytest.raises(TypeError, match="`text` must be a str"):
        init_prompts(torch.nn.Linear(2, 2), 3, None)
    with pytest.raises(ValueError, match="`text` must hold words"):
        init_prompts(torch.nn.Linear(2, 2), " ", None)
    with pytest.raises(TypeError, match="`model` must hold prompt adapters"):
        init_prompts(torch.nn.Linear(2, 2), WORDS, None)
