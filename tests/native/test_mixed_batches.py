"""Many P-tuned tasks on one frozen model: one adapter per row (``adapter_names=[...]``) in a mixed
batch, for v1 prompts and deep prompts, in forward and generate() (the multi-task training job:
tests/train/test_multitask.py).

The oracle is always the same model run on each adapter's rows separately: a mixed batch must give
the same logits, loss and prompt-parameter gradients (fp32, tight tolerances), and the same greedy
tokens. Tiny models from ``tiny_models``; the Triton kernels run under ``TRITON_INTERPRET=1``.
"""
import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, get_peft_model
from tests.tiny_models import PAD, build, padded_batch, random_ids, randomize_

from ptuning_fast import PromptOptions, PTuningModel, get_ptuning_model, use_backend
from ptuning_fast.hf.compat import get_cache

# Three adapters per model: a, b and c, each with its own size and encoder.
LENGTHS = {"equal": {"a": 3, "b": 3, "c": 3}, "unequal": {"a": 4, "b": 1, "c": 3}}
ROWS = ["a", "b", "a", "c", "b"]  # one adapter name per row; "a" and "b" hold two rows each
TEXT = [5, 3, 6, 2, 4]  # real tokens per row (width 6)


def config_of(kind, tokens, index=0):
    if kind == "v1":  # different encoder widths and heads, so the adapters differ in more than values
        return PromptEncoderConfig(num_virtual_tokens=tokens, encoder_hidden_size=12 + 4 * index,
                                   encoder_reparameterization_type="LSTM" if index == 2 else "MLP")
    return PrefixTuningConfig(num_virtual_tokens=tokens, prefix_projection=index == 1, encoder_hidden_size=10)


def multi_adapter_model(name, kind, lengths="unequal", seed=0, positions="continue"):
    base, task = build(name, seed)
    sizes = LENGTHS[lengths]
    model = None
    for index, adapter in enumerate(sizes):
        config = config_of(kind, sizes[adapter], index)
        if model is None:
            model = get_ptuning_model(base.eval(), config, adapter_name=adapter, positions=positions)
        else:
            model.add_adapter(adapter, config, PromptOptions(positions=positions))
    randomize_(model.prompt_encoder, seed + 50)
    return model, task



def labels_and_counts(task, ids, mask, seed):
    """Fresh labels and, per row, how many loss terms they give (so losses can be recombined).

    Causal LM: every real token but the first of its row is a label, so each label is predicted
    from the row's previous real token whatever the layout."""
    if task == "SEQ_CLS":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 3, (ids.shape[0],), generator=g), torch.ones(ids.shape[0])
    first = mask.cumsum(1) == 1
    labels = ids.masked_fill((mask == 0) | first, -100)
    return labels, (labels != -100).sum(1).float()


def prompt_grads(model):
    return {n: p.grad.clone() for n, p in model.prompt_encoder.named_parameters() if p.grad is not None}


def by_adapter(names):
    groups = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    return groups


def assert_mixed_equals_separate(model, task, ids, mask, names, seed=7, rtol=1e-5, atol=1e-6):
    """The mixed batch vs each adapter's rows run on their own: logits, loss, every prompt gradient."""
    labels, counts = labels_and_counts(task, ids, mask, seed)
    model.zero_grad(set_to_none=True)
    mixed = model(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names)
    mixed.loss.backward()
    mixed_grads = prompt_grads(model)

    model.zero_grad(set_to_none=True)
    recombined = 0.0
    for name, rows in by_adapter(names).items():
        rows = torch.tensor(rows)
        alone = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows], adapter_names=[name] * len(rows))
        if task == "CAUSAL_LM":  # compare the real tokens only: padding outputs mean nothing
            real = mask[rows].bool()
            torch.testing.assert_close(mixed.logits[rows][real], alone.logits[real], rtol=rtol, atol=atol)
        else:
            torch.testing.assert_close(mixed.logits[rows], alone.logits, rtol=rtol, atol=atol)
        # The mixed loss is the mean over all loss terms: each adapter's mean, weighted by its terms.
        weighted = alone.loss * counts[rows].sum() / counts.sum()
        weighted.backward()
        recombined = recombined + weighted.detach()
    torch.testing.assert_close(mixed.loss.detach(), recombined, rtol=1e-6, atol=1e-7)
    separate_grads = prompt_grads(model)

    used = {f"{name}." for name in names}
    expected = {n for n, p in model.prompt_encoder.named_parameters() if any(n.startswith(u) for u in used)}
    assert set(mixed_grads) == set(separate_grads) == expected  # every used adapter, and only those
    for key, grad in separate_grads.items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(mixed_grads[key], grad, rtol=1e-4, atol=1e-7, msg=key)
    return mixed


# ---------------------------------------------------------------------------------------------
# forward: mixed batch == each adapter's rows on their own
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("lengths", ["equal", "unequal"])
@pytest.mark.parametrize("kind", ["v1", "v2"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_cls", "bert_cls"])
def test_mixed_batch_equals_each_adapter_alone(name, kind, lengths, side):
    model, task = multi_adapter_model(name, kind, lengths)
    ids, mask = padded_batch(TEXT, 6, seed=11, side=side)
    assert_mixed_equals_separate(model, task, ids, mask, ROWS)


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_rows_differ_with_their_adapter(kind):
    """The adapter choice reaches the outputs (so the comparisons above can fail)."""
    model, _ = multi_adapter_model("llama", kind, "equal")
    ids = random_ids(1, 5, 12).expand(3, -1)
    logits = model(input_ids=ids, adapter_names=["a", "b", "c"]).logits
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])
    swapped = model(input_ids=ids, adapter_names=["b", "a", "c"]).logits
    torch.testing.assert_close(swapped[[1, 0, 2]], logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_mixed_batch_under_training_mode_and_inputs_embeds(kind):
    model, task = multi_adapter_model("llama", kind, "unequal", seed=3)
    model.train()
    ids, mask = padded_batch(TEXT, 6, seed=13, side="left")
    embeds = model.get_input_embeddings()(ids)
    mixed = model(inputs_embeds=embeds, attention_mask=mask, adapter_names=ROWS).logits
    for name, rows in by_adapter(ROWS).items():
        alone = model(inputs_embeds=embeds[rows], attention_mask=mask[rows], adapter_names=[name] * len(rows)).logits
        real = mask[rows].bool()
        torch.testing.assert_close(mixed[rows][real], alone[real], rtol=1e-5, atol=1e-6)


def test_mixed_seq2seq_deep_prompts_of_one_length():
    model, _ = multi_adapter_model("t5", "v2", "equal")
    ids, mask = padded_batch(TEXT, 6, seed=14, side="right")
    decoder = random_ids(5, 3, 15)
    labels = random_ids(5, 3, 16)
    mixed = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, labels=labels, adapter_names=ROWS)
    for name, rows in by_adapter(ROWS).items():
        alone = model(input_ids=ids[rows], attention_mask=mask[rows], decoder_input_ids=decoder[rows],
                      adapter_names=[name] * len(rows))
        torch.testing.assert_close(mixed.logits[rows], alone.logits, rtol=1e-5, atol=1e-6)
    mixed.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prompt_encoder.parameters())


# ---------------------------------------------------------------------------------------------
# generate(): the same greedy tokens as each adapter's rows on their own
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", ["equal", "unequal"])
@pytest.mark.parametrize("kind", ["v1", "v2"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_mixed_generate_equals_each_adapter_alone(name, kind, lengths):
    model, _ = multi_adapter_model(name, kind, lengths, seed=2)
    randomize_(model.prompt_encoder, 77, scale=2.0)  # prompts strong enough to steer the tokens
    ids, mask = padded_batch(TEXT, 6, seed=17, side="left")
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=ROWS, **settings)
    assert mixed.shape == (5, 6 + 4) and torch.equal(mixed[:, :6], ids)
    for name_, rows in by_adapter(ROWS).items():
        alone = model.generate(input_ids=ids[rows], attention_mask=mask[rows], adapter_names=[name_] * len(rows),
                               **settings)
        assert torch.equal(mixed[rows], alone), name_
    one_adapter = model.generate(input_ids=ids, attention_mask=mask, adapter_names=["a"] * 5, **settings)
    assert not torch.equal(one_adapter, mixed)  # the other rows' adapters changed their tokens


def test_mixed_generate_with_beams_and_seq2seq():
    model, _ = multi_adapter_model("llama", "v2", "unequal", seed=4)
    randomize_(model.prompt_encoder, 78, scale=2.0)
    ids, mask = padded_batch([4, 2, 5], 5, seed=18, side="left")
    names = ["c", "a", "b"]
    settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2,
                    pad_token_id=PAD)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **settings)
    for row, name in enumerate(names):
        alone = model.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], adapter_names=[name],
                               **settings)
        assert torch.equal(mixed[2 * row:2 * row + 2], alone)

    model, _ = multi_adapter_model("t5", "v2", "equal", seed=5)
    randomize_(model.prompt_encoder, 79, scale=2.0)
    ids, mask = padded_batch([4, 2, 5], 5, seed=19, side="right")
    settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **settings)
    for row, name in enumerate(names):
        alone = model.generate(input_ids=ids[row:row + 1, :int(mask[row].sum())], adapter_names=[name], **settings)
        assert torch.equal(mixed[row], alone[0])


# ---------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) with per-row adapters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_kernels_with_per_row_adapters(kind):
    """Mixed batch through the Triton kernels: error vs a float64 oracle within twice the error of
    the PyTorch reference in float32 (plus a tiny absolute term), outputs and prompt gradients."""
    ids, mask = padded_batch([4, 2, 5], 5, seed=21, side="left")
    names = ["b", "a", "c"]
    labels, _ = labels_and_counts("CAUSAL_LM", ids, mask, 22)

    def run(dtype, backend):
        model, _ = multi_adapter_model("llama", kind, "unequal", seed=6)
        model.to(dtype)
        model.train()  # the encoders' training path (no cached prompts)
        with use_backend(backend):
            out = model(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names)
            out.loss.backward()
        real = mask.bool()
        return {"logits": out.logits[real].detach().double(), "loss": out.loss.detach().double(),
                **{k: g.double() for k, g in prompt_grads(model).items()}}

    oracle, reference, kernel = run(torch.float64, "reference"), run(torch.float32, "reference"), \
        run(torch.float32, "triton")
    assert set(kernel) == set(oracle)
    for key, expected in oracle.items():
        ref_err = (reference[key] - expected).abs().max()
        err = (kernel[key] - expected).abs().max()
        assert err <= 2 * ref_err + 1e-6 * (1 + expected.abs().max()), (key, float(err), float(ref_err))


def test_deep_prompt_cache_encodes_each_adapter_once():
    model, _ = multi_adapter_model("llama", "v2", "unequal")
    calls = {name: 0 for name in LENGTHS["unequal"]}
    hooks = []
    for name, encoder in model.prompt_encoder.items():
        original = encoder.prefix_weights

        def counted(original=original, name=name):
            calls[name] += 1
            return original()

        encoder.prefix_weights = counted
        hooks.append(encoder)
    ids, mask = padded_batch(TEXT, 6, seed=23, side="left")
    seen = []
    hook = model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(get_cache(kwargs)), with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=mask, adapter_names=ROWS)
    finally:
        hook.remove()
        for encoder in hooks:
            del encoder.prefix_weights
    assert calls == {"a": 1, "b": 1, "c": 1}  # once per adapter, not once per row
    cache = seen[0]
    assert cache.prompt_lengths().tolist() == [4, 1, 4, 3, 1] and cache.num_virtual_tokens == 4


# ---------------------------------------------------------------------------------------------
@pytest.mark.peft_oracle
# PEFT adapter folders: trained by PEFT, served together here
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_two_peft_adapters_served_in_one_batch(kind, tmp_path):
    folders, peft_models = {}, {}
    for index, (name, tokens) in enumerate((("sentiment", 4), ("topic", 2))):
        base, _ = build("llama")
        config = config_of(kind, tokens, index)
        config.task_type = "CAUSAL_LM"
        peft_model = get_peft_model(base.eval(), config)
        randomize_(peft_model.prompt_encoder, 100 + index)
        peft_model.save_pretrained(tmp_path / name)
        folders[name], peft_models[name] = tmp_path / name, PeftModel.from_pretrained(build("llama")[0].eval(),
                                                                                      tmp_path / name)
    base, _ = build("llama")
    model = PTuningModel.from_pretrained(base.eval(), folders["sentiment"], adapter_name="sentiment")
    model.load_adapter(folders["topic"], adapter_name="topic")
    ids = random_ids(4, 5, 31)
    names = ["topic", "sentiment", "sentiment", "topic"]
    mixed = model(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        expected = peft_models[name](input_ids=ids[row:row + 1]).logits[0]
        if kind == "v1":
            expected = expected[-5:]  # PEFT's logits include the prompt columns
        torch.testing.assert_close(mixed[row], expected, rtol=1e-5, atol=1e-5)
    settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=PAD)
    tokens = model.generate(input_ids=ids, adapter_names=names, **settings)
    for row, name in enumerate(names):
        assert torch.equal(tokens[row, -3:], peft_models[name].generate(input_ids=ids[row:row + 1], **settings)[0, -3:])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_errors_name_the_argument_and_say_why():
    model, _ = multi_adapter_model("gpt2", "v2", "unequal")
    ids = random_ids(2, 4, 41)
    with pytest.raises(ValueError, match="adapter_names.*unknown adapter 'd'; known: \\['a', 'b', 'c'\\]"):
        model(input_ids=ids, adapter_names=["a", "d"])
    with pytest.raises(ValueError, match="adapter_names.*3 names for a batch of 2"):
        model(input_ids=ids, adapter_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="adapter_names.*1 names for a batch of 2"):
        model.generate(input_ids=ids, adapter_names=["a"], max_new_tokens=1)
    with pytest.raises(TypeError, match="adapter_names.*list"):
        model(input_ids=ids, adapter_names=("a" for _ in range(2)))
    with pytest.raises(TypeError, match="adapter_names.*adapter names \\(str\\)"):
        model(input_ids=ids, adapter_names=["a", 3])
    model.add_adapter("v1", config_of("v1", 2))
    with pytest.raises(ValueError, match="mixes prompt kinds.*'v1': 'P_TUNING'.*input tokens.*attention-cache"):
        model(input_ids=ids, adapter_names=["a", "v1"])
    model.add_adapter("restart", config_of("v2", 2), PromptOptions(positions="restart"))
    with pytest.raises(ValueError, match="mixes positions='continue' and 'restart'.*'restart': 'restart'"):
        model(input_ids=ids, adapter_names=["restart", "b"])
    model.add_adapter("template", config_of("v1", 2), PromptOptions(placement="template", prompt_token_id=99))
    with pytest.raises(ValueError, match="mixes template and prefix placements.*'template': \\('template', 99\\)"):
        model(input_ids=ids, adapter_names=["v1", "template"])

    seq2seq, _ = multi_adapter_model("t5", "v2", "unequal")
    with pytest.raises(ValueError, match="different lengths \\{'a': 4, 'b': 1\\} on a seq2seq model"):
        seq2seq(input_ids=ids, decoder_input_ids=ids, adapter_names=["a", "b"])
    seq2seq(input_ids=ids, decoder_input_ids=ids, adapter_names=["a", "a"])  # one adapter: fine


def test_unequal_deep_prompts_need_position_ids():
    model, _ = multi_adapter_model("llama_without_position_ids", "v2", "unequal")
    ids = random_ids(2, 4, 42)
    with pytest.raises(ValueError, match="takes no `position_ids`.*wrong positions"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model(input_ids=ids, adapter_names=["a", "a"])


def test_mixed_deep_prompts_through_the_models_own_mask():
    """Where the fused 4D mask does not apply (sliding windows, flash attention...), the model builds
    its mask from the (B, P + S) 2D mask, whose empty prefix columns are 0 per row."""
    model, task = multi_adapter_model("mistral", "v2", "unequal", seed=8)
    seen = []
    hook = model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    ids, mask = padded_batch(TEXT, 6, seed=24, side="right")
    try:
        assert_mixed_equals_separate(model, task, ids, mask, ROWS)
    finally:
        hook.remove()
    assert seen[0].shape == (5, 4 + 6) and seen[0][:, :4].tolist()[1] == [0, 0, 0, 1]  # row 1: adapter b, T=1
