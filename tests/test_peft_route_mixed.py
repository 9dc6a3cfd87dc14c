"""PEFT's own keyword on an accelerated ``PeftModel``: ``adapter_names=[...]`` (one name per row)
serves a mixed batch, in ``forward`` and ``generate()``.

The oracle is plain PEFT (an un-accelerated twin holding the same weights) running each row alone
with that row's adapter active: logits of the real tokens, the loss (recombined from each row's
terms), every prompt-parameter gradient and the greedy tokens must match. v1 and deep prompts,
equal and unequal prompt lengths, left padding, causal LM and sequence classification (each
adapter's own classifier copy, PEFT's ``modules_to_save``), the reference backend and the Triton
kernels (Triton's interpreter on CPU).
"""
import copy

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

import ptuning_fast
from tests.tiny_models import PAD, VOCAB, build, padded_batch, randomize_

NAMES = ("a", "b", "c")
LENGTHS = {"equal": (3, 3, 3), "unequal": (4, 1, 3)}
ROWS = ["b", "a", "c", "a", "b"]
TEXT = [5, 3, 6, 2, 4]  # real tokens per row, left-padded to 6


def config_of(kind, tokens, index, task):
    if kind == "v1":
        return PromptEncoderConfig(task_type=task, num_virtual_tokens=tokens, encoder_hidden_size=12 + 4 * index,
                                   encoder_reparameterization_type="LSTM" if index == 2 else "MLP")
    return PrefixTuningConfig(task_type=task, num_virtual_tokens=tokens, prefix_projection=index == 1,
                              encoder_hidden_size=10)


def head_module_cls(name, seed):
    """RoBERTa and Electra: their classification heads are modules of their own (dense, activation,
    out_proj), not a Linear."""
    from transformers import (ElectraConfig, ElectraForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    torch.manual_seed(seed)
    sizes = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=44,
                 max_position_embeddings=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 pad_token_id=PAD, num_labels=3)
    if name == "roberta_cls":
        return RobertaForSequenceClassification(RobertaConfig(**sizes)), "SEQ_CLS"
    return ElectraForSequenceClassification(ElectraConfig(embedding_size=32, **sizes)), "SEQ_CLS"


def twins(name, kind, lengths, seed=0):
    """(plain PEFT model, accelerated copy) with three adapters a, b, c and fresh random weights
    (prompt encoders, and for classification each adapter's classifier copy)."""
    base, task = head_module_cls(name, seed) if name in ("roberta_cls", "electra_cls") else build(name, seed)
    model = None
    for index, (adapter, tokens) in enumerate(zip(NAMES, LENGTHS[lengths])):
        config = config_of(kind, tokens, index, task)
        if model is None:
            model = get_peft_model(base.eval(), config, adapter_name=adapter)
        else:
            model.add_adapter(adapter, config)
    randomize_(model.prompt_encoder, seed + 50)
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and "prompt_encoder" not in n]
    g = torch.Generator().manual_seed(seed + 60)
    with torch.no_grad():
        for p in trainable:  # the classifier copies (modules_to_save): each adapter its own
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, ptuning_fast.accelerate(copy.deepcopy(model)), task


def labels_for(task, ids, mask, seed):
    g = torch.Generator().manual_seed(seed)
    if task == "SEQ_CLS":
        return torch.randint(0, 3, (ids.shape[0],), generator=g)
    first = mask.cumsum(1) == 1  # each label is predicted from the row's previous real token
    return ids.masked_fill((mask == 0) | first, -100)


def terms(task, labels):
    return torch.ones(labels.shape[0]) if task == "SEQ_CLS" else (labels != -100).sum(1).float()


def grads_of(model):
    """Every prompt-parameter gradient. (A classifier copy trains only while its adapter is the
    active one: PEFT freezes the others' ``modules_to_save``, in a mixed batch too.)"""
    return {n: p.grad.clone() for n, p in model.prompt_encoder.named_parameters() if p.grad is not None}


def assert_rows_equal_peft_alone(plain, fast, task, kind, ids, mask, names, rtol=1e-5, atol=1e-5):
    labels = labels_for(task, ids, mask, seed=7)
    counts = terms(task, labels)
    fast.zero_grad(set_to_none=True)
    mixed = fast(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names)
    mixed.loss.backward()
    mixed_grads = grads_of(fast)

    plain.zero_grad(set_to_none=True)
    recombined = 0.0
    width = ids.shape[1]
    for row, name in enumerate(names):
        plain.set_adapter(name)
        alone = plain(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], labels=labels[row:row + 1])
        if task == "SEQ_CLS":
            torch.testing.assert_close(mixed.logits[row], alone.logits[0], rtol=rtol, atol=atol)
        else:  # PEFT's layout: prompt columns first; compare the real text tokens
            real = mask[row].bool()
            got, expected = mixed.logits[row, -width:], alone.logits[0, -width:]
            torch.testing.assert_close(got[real], expected[real], rtol=rtol, atol=atol)
        weighted = alone.loss * counts[row] / counts.sum()
        weighted.backward()
        recombined = recombined + weighted.detach()
    torch.testing.assert_close(mixed.loss.detach(), recombined, rtol=1e-5, atol=1e-6)
    expected_grads = grads_of(plain)
    used = {f"{name}." for name in names}
    assert set(mixed_grads) == set(expected_grads) == {
        n for n, p in fast.prompt_encoder.named_parameters() if any(n.startswith(u) for u in used)}
    for key, grad in expected_grads.items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(mixed_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.peft_oracle
@pytest.mark.parametrize("lengths", ["equal", "unequal"])
@pytest.mark.parametrize("kind", ["v1", "v2"])
@pytest.mark.parametrize("name", ["llama", "llama_cls", "bert_cls"])
def test_mixed_batch_equals_each_adapter_alone_in_plain_peft(name, kind, lengths):
    plain, fast, task = twins(name, kind, lengths)
    ids, mask = padded_batch(TEXT, 6, seed=11, side="left")
    assert_rows_equal_peft_alone(plain, fast, task, kind, ids, mask, ROWS)


@pytest.mark.peft_oracle
@pytest.mark.parametrize("kind", ["v1", "v2"])
@pytest.mark.parametrize("name", ["roberta_cls", "electra_cls"])
def test_mixed_batch_on_a_classification_head_that_is_not_a_linear(name, kind):
    """PEFT's own mixed batch refuses such heads; here each adapter's head copy serves its rows."""
    plain, fast, task = twins(name, kind, "equal", seed=8)
    ids, mask = padded_batch(TEXT, 6, seed=15, side="right")
    assert_rows_equal_peft_alone(plain, fast, task, kind, ids, mask, ROWS)


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_mixed_batch_with_the_kernels(kind):
    plain, fast, task = twins("llama", kind, "unequal", seed=3)
    ids, mask = padded_batch(TEXT, 6, seed=12, side="left")
    with ptuning_fast.use_backend("triton"):
        assert_rows_equal_peft_alone(plain, fast, task, kind, ids, mask, ROWS, rtol=1e-4, atol=1e-5)


@pytest.mark.peft_oracle
@pytest.mark.parametrize("lengths", ["equal", "unequal"])
@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_mixed_generate_equals_each_adapter_alone_in_plain_peft(kind, lengths):
    plain, fast, _ = twins("llama", kind, lengths, seed=2)
    for model in (plain, fast):
        randomize_(model.prompt_encoder, 77, scale=2.0)  # prompts strong enough to steer the tokens
    ids, mask = padded_batch(TEXT, 6, seed=17, side="left")
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD)
    mixed = fast.generate(input_ids=ids, attention_mask=mask, adapter_names=ROWS, **settings)
    assert mixed.shape == (5, 6 + 4) and torch.equal(mixed[:, :6], ids)
    for row, name in enumerate(ROWS):
        plain.set_adapter(name)
        alone = plain.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], **settings)
        assert torch.equal(mixed[row, -4:], alone[0, -4:]), (row, name)
    assert not torch.equal(fast.generate(input_ids=ids, attention_mask=mask, **settings), mixed)


def test_the_active_adapter_serves_rows_that_name_none():
    plain, fast, task = twins("llama", "v2", "unequal", seed=4)
    ids, mask = padded_batch(TEXT, 6, seed=13, side="left")
    fast.set_adapter("c")
    plain.set_adapter("c")
    torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask, adapter_names=["c"] * 5).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_adapter_names_errors_name_the_adapters():
    _, fast, _ = twins("llama", "v1", "unequal")
    ids = padded_batch([3, 3], 3, seed=14, side="left")[0]
    with pytest.raises(ValueError, match="adapter_names.*unknown adapter 'd'; known: \\['a', 'b', 'c'\\]"):
        fast(input_ids=ids, adapter_names=["a", "d"])
    with pytest.raises(ValueError, match="adapter_names.*3 names for a batch of 2"):
        fast(input_ids=ids, adapter_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="adapter_names.*1 names for a batch of 2"):
        fast.generate(input_ids=ids, adapter_names=["a"], max_new_tokens=1)
    with pytest.raises(TypeError, match="adapter_names.*list"):
        fast(input_ids=ids, adapter_names="a")
    # An adapter added after accelerate() (PEFT's own encoder, PEFT's init) is served too.
    fast.add_adapter("late", config_of("v1", 2, 0, "CAUSAL_LM"))
    plain = copy.deepcopy(fast)
    mixed = fast(input_ids=ids, adapter_names=["late", "a"]).logits
    plain.set_adapter("late")
    alone = type(plain).forward(plain, input_ids=ids[:1]).logits  # PEFT's own forward
    torch.testing.assert_close(mixed[0, -3:], alone[0, -3:], rtol=1e-5, atol=1e-5)

    seq2seq, fast_seq2seq, _ = twins("t5", "v2", "unequal")
    with pytest.raises(ValueError, match="different lengths \\{'a': 4, 'b': 1\\} on a seq2seq model"):
        fast_seq2seq(input_ids=ids, decoder_input_ids=ids, adapter_names=["a", "b"])


@pytest.mark.peft_oracle
@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_mixed_beam_search_with_a_head_copy_per_adapter(kind):
    """Each adapter has its own ``lm_head`` copy (``modules_to_save``); beam search repeats each
    row, and each repeated row still goes through its adapter's copy."""
    base, task = build("llama", 9)
    make = (lambda: PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=12,
                                        modules_to_save=["lm_head"])) if kind == "v1" else (
        lambda: PrefixTuningConfig(task_type=task, num_virtual_tokens=3, modules_to_save=["lm_head"]))
    plain = get_peft_model(base.eval(), make(), adapter_name="a")
    plain.add_adapter("b", make())
    randomize_(plain.prompt_encoder, 90, scale=2.0)
    copies = [p for n, p in plain.named_parameters() if "modules_to_save" in n]
    assert len(copies) == 2
    randomize_(torch.nn.ParameterList(copies), 91, scale=1.0)
    fast = ptuning_fast.accelerate(copy.deepcopy(plain))
    ids, mask = padded_batch([6, 4, 5], 6, seed=18, side="left")
    names = ["b", "a", "b"]
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD, num_beams=2,
                    num_return_sequences=2)
    mixed = fast.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **settings)
    for row, name in enumerate(names):
        plain.set_adapter(name)
        alone = plain.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], **settings)
        assert torch.equal(mixed[2 * row:2 * row + 2, -4:], alone[:, -4:]), (row, name)
