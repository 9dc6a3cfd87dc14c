"""``init_prompts_from_text``: a prompt initialised from a text behaves like that text, through the
native model and an accelerated PeftModel, for v1 prompts (MLP, LSTM) and deep prompts."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, get_peft_model
from tests.tiny_models import VOCAB, build, prompt_configs, random_ids, randomize_

import ptuning_fast
from ptuning_fast import get_ptuning_model, init_prompts_from_text

T = 4
KINDS = prompt_configs(T)


def relative_error(got, expected):
    return float((got - expected).norm() / expected.norm())


def wrap(route, base, config):
    if route == "native":
        return get_ptuning_model(base, config)
    if route == "peft_plain":  # PEFT's own encoders: any holder works
        return get_peft_model(base, config)
    return ptuning_fast.accelerate(get_peft_model(base, config))


def text_logits(model, ids):
    """Logits of the columns of ``ids`` (PEFT's v1 causal-LM logits also hold the prompt's)."""
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -ids.shape[1]:]


def logits_after_words(bare, token_ids, ids):
    """Logits of ``ids`` after the words themselves, through the bare base model."""
    words = torch.tensor(token_ids).expand(ids.shape[0], -1)
    with torch.no_grad():
        return bare(input_ids=torch.cat([words, ids], dim=1)).logits[:, -ids.shape[1]:]


def words_as_prompt(bare, token_ids, deep):
    """What the adapter should hold, computed here independently: v1, the input embeddings of the
    words; deep prompts, the keys/values of the words (the model's own cache), flattened by PEFT's
    formula: element ((l * 2 + s) * Hkv + h) * Dh + d."""
    ids = torch.tensor(token_ids)
    with torch.no_grad():
        if not deep:
            return bare.get_input_embeddings()(ids)
        cache = bare(input_ids=ids[None], use_cache=True).past_key_values
    columns = []
    for layer in cache.layers:
        for states in (layer.keys, layer.values):  # (1, Hkv, T, Dh)
            columns += [states[0, head] for head in range(states.shape[1])]
    return torch.cat(columns, dim=1)


def case(name, kind, route, seed, config=None):
    """(model holding a freshly initialised adapter, the bare base model with the same weights)."""
    base, task = build(name, seed)
    bare = copy.deepcopy(base).eval()
    model = wrap(route, base.eval(), (config or KINDS[kind])(task)).eval()
    randomize_(model.prompt_encoder, seed + 1, scale=0.3)  # not the initialisation's values
    return model, bare


@pytest.mark.parametrize("route", ["native", "peft", "peft_plain"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_prompt_from_a_text_gives_the_logits_of_that_text(name, kind, route):
    seed = 11 + len(kind) + len(name)
    model, bare = case(name, kind, route, seed)
    text = random_ids(1, 3, seed)[0]  # shorter than the prompt: repeated, as PEFT does
    x = random_ids(2, 7, seed + 2)
    before = text_logits(model, x)

    result = init_prompts_from_text(model, text)

    assert result.adapter_name == "default" and result.method == "exact"
    assert result.token_ids == tuple(text.tolist() + text.tolist()[:1])
    assert result.max_relative_error < 1e-5
    with torch.no_grad():
        encoded = model.prompt_encoder["default"](torch.arange(T)[None])[0]
    assert relative_error(encoded, words_as_prompt(bare, result.token_ids, kind.startswith("prefix"))) < 1e-5
    expected = logits_after_words(bare, result.token_ids, x)
    assert relative_error(text_logits(model, x), expected) <= 1e-3
    assert relative_error(before, expected) > 1e-2  # the comparison can fail


@pytest.mark.parametrize("kind", ["mlp", "prefix_proj"])
def test_the_parameters_are_written_in_place(kind):
    model, bare = case("llama", kind, "peft", 5)
    encoder = model.prompt_encoder["default"]
    encoder.double()  # a dtype other than the base model's must stay
    parameters = {name: p for name, p in encoder.named_parameters()}
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)

    result = init_prompts_from_text(model, random_ids(1, 5, 6)[0])

    assert {name: p for name, p in encoder.named_parameters()} == parameters  # the same objects
    assert all(p.dtype == torch.float64 and p.requires_grad for p in encoder.parameters())
    x = random_ids(2, 5, 7)
    assert relative_error(text_logits(model, x), logits_after_words(bare, result.token_ids, x)) <= 1e-3
    loss = model(input_ids=x, labels=x).loss  # an optimizer built before still steps the prompt
    loss.backward()
    optimizer.step()
    assert relative_error(text_logits(model, x), logits_after_words(bare, result.token_ids, x)) > 1e-6


@pytest.mark.parametrize("name, config, length", [
    ("llama", PromptEncoderConfig(num_virtual_tokens=T, encoder_hidden_size=20), T),
    ("t5", PromptEncoderConfig(num_virtual_tokens=T, encoder_hidden_size=20), 2 * T),  # both transformer halves
    ("llama", PrefixTuningConfig(num_virtual_tokens=T), T),
])
@pytest.mark.parametrize("text_length", [3, 9])
def test_the_text_is_repeated_or_cut_as_peft_does(name, config, length, text_length):
    base, task = build(name)
    config.task_type = task
    model = get_ptuning_model(base, config)
    text = random_ids(1, text_length, 40 + text_length)[0].tolist()
    expected = (text * 3)[:length]
    assert init_prompts_from_text(model, text).token_ids == tuple(expected)
    assert init_prompts_from_text(model, torch.tensor(text, dtype=torch.int32)).token_ids == tuple(expected)


@pytest.mark.parametrize("route", ["native", "peft"])
def test_an_encoder_too_narrow_for_a_solve_is_fitted(route):
    # 12 virtual tokens, 8 hidden units: the hidden activations have rank <= 9 < 12, no exact solve;
    # a 5-token text repeated has 5 distinct rows, which the fit (all parameters) reaches.
    narrow = lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=12, encoder_hidden_size=8)
    model, bare = case("llama", None, route, 21, config=narrow)
    result = init_prompts_from_text(model, random_ids(1, 5, 22)[0])

    assert result.method == "fitted" and result.max_relative_error <= 1e-4
    with torch.no_grad():
        encoded = model.prompt_encoder["default"](torch.arange(12)[None])[0]
        words = bare.get_input_embeddings()(torch.tensor(result.token_ids))
    per_token = ((encoded - words).norm(dim=1) / words.norm(dim=1)).max()
    assert float(per_token) == pytest.approx(result.max_relative_error, rel=1e-2, abs=1e-7)
    x = random_ids(2, 6, 23)
    assert relative_error(text_logits(model, x), logits_after_words(bare, result.token_ids, x)) <= 1e-3


def test_a_fit_that_cannot_be_exact_reports_the_error_it_reached():
    # 12 distinct words cannot come out of 4 hidden units: the fit does what it can and says so.
    narrow = lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=12, encoder_hidden_size=4)
    model, bare = case("llama", None, "native", 31, config=narrow)
    text = torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(32))[:12] + 3
    result = init_prompts_from_text(model, text)

    assert result.method == "fitted" and 1e-3 < result.max_relative_error < 1.0
    with torch.no_grad():
        encoded = model.prompt_encoder["default"].encoded_prompts()
        words = bare.get_input_embeddings()(text)
    per_token = ((encoded - words).norm(dim=1) / words.norm(dim=1)).max()
    assert float(per_token) == pytest.approx(result.max_relative_error, rel=1e-3)


@pytest.mark.parametrize("kind", ["mlp", "prefix"])
def test_inference_mode_adapters_get_the_words_written(tmp_path, kind):
    trained, _ = case("gpt2", kind, "peft", 51)
    trained.save_pretrained(tmp_path)
    base, _ = build("gpt2", 51)
    bare = copy.deepcopy(base).eval()
    loaded = ptuning_fast.accelerate(PeftModel.from_pretrained(base.eval(), tmp_path))
    assert loaded.active_peft_config.inference_mode
    result = init_prompts_from_text(loaded, random_ids(1, 2, 52)[0])
    assert result.method == "exact" and result.max_relative_error == 0.0
    x = random_ids(3, 5, 53)
    assert relative_error(text_logits(loaded, x), logits_after_words(bare, result.token_ids, x)) <= 1e-3


def test_only_the_named_adapter_changes():
    model, bare = case("llama", "mlp", "native", 61)
    model.add_adapter("deep", KINDS["prefix_proj"]("CAUSAL_LM"))
    randomize_(model.prompt_encoder["deep"], 62)
    untouched = {k: v.clone() for k, v in model.prompt_encoder["default"].state_dict().items()}
    result = init_prompts_from_text(model, random_ids(1, 4, 63)[0], adapter_name="deep")

    assert result.adapter_name == "deep"
    for key, value in model.prompt_encoder["default"].state_dict().items():
        assert torch.equal(value, untouched[key])
    x = random_ids(2, 5, 64)
    with torch.no_grad():
        got = model(input_ids=x, adapter_names=["deep", "deep"]).logits
    assert relative_error(got, logits_after_words(bare, result.token_ids, x)) <= 1e-3


def test_the_embedded_minilm_prompt_points_at_the_words():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ptuning_fast.train import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(71)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = ptuning_fast.accelerate(get_peft_model(base, PromptEncoderConfig(task_type="SEQ_CLS",
                                                                             num_virtual_tokens=10)))
    text = "Sentiment of the review:"
    result = init_prompts_from_text(model, text, tokenizer)

    words = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert result.token_ids == tuple((words * 2)[:10]) and result.method == "exact"
    encoded = model.prompt_encoder["default"].encoded_prompts()
    embeddings = base.get_input_embeddings()(torch.tensor(result.token_ids))
    assert float(torch.nn.functional.cosine_similarity(encoded, embeddings, dim=1).min()) >= 0.999


def test_errors_name_the_argument():
    base, task = build("llama")
    model = get_ptuning_model(base, KINDS["mlp"](task))
    with pytest.raises(ValueError, match="`tokenizer` is needed"):
        init_prompts_from_text(model, "a string")
    with pytest.raises(TypeError, match="`tokenizer` must be"):
        init_prompts_from_text(model, "a string", tokenizer=3)
    with pytest.raises(ValueError, match="`text` '  ' gives no tokens"):
        init_prompts_from_text(model, "  ", tokenizer=lambda text, add_special_tokens: {"input_ids": []})
    for empty in ([], torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="`text` is empty"):
            init_prompts_from_text(model, empty)
    for outside in ([3, VOCAB], torch.tensor([-1, 4])):
        with pytest.raises(ValueError, match=r"`text` holds token ids outside the vocabulary \[0, 61\)"):
            init_prompts_from_text(model, outside)
    for wrong in (torch.tensor([1.0, 2.0]), torch.tensor([[3, 4]]), [True, False], [3, 4.0], b"\x03", {"a": 1}, None):
        with pytest.raises(TypeError, match="`text`"):
            init_prompts_from_text(model, wrong)
    with pytest.raises(ValueError, match=r"`adapter_name`: unknown adapter 'other'; known: \['default'\]"):
        init_prompts_from_text(model, [3, 4], adapter_name="other")
    with pytest.raises(TypeError, match="`adapter_name` must be a str"):
        init_prompts_from_text(model, [3, 4], adapter_name=0)
    for not_a_holder in (build("llama")[0], "model"):
        with pytest.raises(TypeError, match="`model` must be a PTuningModel or a peft.PeftModel"):
            init_prompts_from_text(not_a_holder, [3, 4])
    lora = get_peft_model(build("llama")[0], LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not prompt-learning"):
        init_prompts_from_text(lora, [3, 4])
    t5, task = build("t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        init_prompts_from_text(get_ptuning_model(t5, KINDS["prefix"](task)), [3, 4])
