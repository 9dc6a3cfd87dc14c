"""Deep prompts on real (tiny) transformers models against PEFT's PREFIX_TUNING.

For each model the base model is run with this package's prefix cache (``prefix_forward``) and
compared with the ``PeftModel`` holding the same encoder: same loss and the same gradients of the
prefix parameters (fp32, 1e-5 relative), identical greedy ``generate()`` tokens. Also: left/right
padding, gradient checkpointing (which PEFT refuses), a bf16 model with fp32 adapters, and a batch
that mixes two adapters (equal to running each adapter's rows alone).
"""
import threading

import pytest
import torch
import torch.nn.functional as F
from peft import PrefixTuningConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
)

from ptuning_fast import PrefixEncoder, build_prefix_cache, prefix_forward, prefix_generate, use_backend
from ptuning_fast.hf.introspection import prefix_geometry
from ptuning_fast.prefix_tuning.functional import prefix_attention_mask, prefix_position_ids

VOCAB, PAD = 53, 0
SMALL = dict(hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def llama():  # grouped-query attention: 4 query heads, 2 KV heads
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, pad_token_id=PAD, **SMALL))


def qwen2():
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, pad_token_id=PAD, **SMALL))


def qwen3():  # head_dim from the config (not hidden / heads)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, num_key_value_heads=1, head_dim=12, pad_token_id=PAD,
                                        **SMALL))


def mistral():
    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, num_key_value_heads=2, pad_token_id=PAD,
                                            sliding_window=None, **SMALL))


def gpt2():  # learned absolute positions: a position mistake changes the output
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD))


def bert(cls, **kw):
    return cls(BertConfig(vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          pad_token_id=PAD, **SMALL, **kw))


MODELS = {
    "llama": (llama, "CAUSAL_LM"),
    "gpt2": (gpt2, "CAUSAL_LM"),
    "qwen2": (qwen2, "CAUSAL_LM"),
    "qwen3": (qwen3, "CAUSAL_LM"),
    "mistral": (mistral, "CAUSAL_LM"),
    "bert_cls": (lambda: bert(BertForSequenceClassification, num_labels=3), "SEQ_CLS"),
    "bert_token": (lambda: bert(BertForTokenClassification, num_labels=4), "TOKEN_CLS"),
}


def randomize_(module, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def peft_model(name, *, projection, tokens=4, seed=0, model=None):
    builder, task = MODELS[name]
    torch.manual_seed(seed)
    base = model if model is not None else builder()
    config = PrefixTuningConfig(task_type=task, num_virtual_tokens=tokens, prefix_projection=projection,
                                encoder_hidden_size=20)
    peft = get_peft_model(base, config)
    randomize_(peft.prompt_encoder["default"], seed + 100)
    return peft, base, peft.prompt_encoder["default"], task


def batch(task, rows=3, length=6, seed=1, pad_side="right"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    if pad_side == "right":
        mask[1, length - 2:] = 0
    else:
        mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    if task == "CAUSAL_LM":
        labels = ids.masked_fill(mask == 0, -100)
    elif task == "SEQ_CLS":
        labels = torch.randint(0, 3, (rows,), generator=g)
    else:
        labels = torch.randint(0, 4, (rows, length), generator=g).masked_fill(mask == 0, -100)
    return ids, mask, labels


def grads(loss, encoder):
    return torch.autograd.grad(loss, list(encoder.parameters()))


def assert_grads_close(got, ref, rtol=1e-5):
    for g, r in zip(got, ref):
        scale = r.abs().max().item()
        assert scale > 0
        assert (g - r).abs().max().item() <= rtol * scale, f"{(g - r).abs().max().item()} vs scale {scale}"


# ----------------------------------------------------------------------------- loss and gradients
CASES = [("llama", False, "triton"), ("llama", True, "triton"), ("llama", True, "reference"),
         ("gpt2", False, "reference"), ("gpt2", True, "triton"),
         ("bert_cls", False, "triton"), ("bert_cls", True, "reference"), ("bert_token", True, "triton"),
         ("qwen2", True, "reference"), ("qwen3", False, "triton"), ("mistral", True, "reference")]


@pytest.mark.peft_oracle
@pytest.mark.parametrize("name,projection,backend", CASES)
def test_loss_and_prefix_gradients_match_peft(name, projection, backend):
    peft, base, encoder, task = peft_model(name, projection=projection)
    ids, mask, labels = batch(task)
    peft.train()
    ref = peft(input_ids=ids, attention_mask=mask, labels=labels)
    ref_grads = grads(ref.loss, encoder)
    with use_backend(backend):
        out = prefix_forward(base, encoder, input_ids=ids, attention_mask=mask, labels=labels)
        got = grads(out.loss, encoder)
    keep = mask.bool() if out.logits.dim() == 3 else slice(None)  # padding positions are free to differ
    torch.testing.assert_close(out.logits[keep], ref.logits[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    assert_grads_close(got, ref_grads)


def test_our_encoder_in_peft_gives_the_same_numbers():
    """Our PrefixEncoder swapped into the PeftModel (what accelerate() does) changes nothing."""
    peft, base, theirs, task = peft_model("llama", projection=True)
    ids, mask, labels = batch(task)
    ref = peft(input_ids=ids, attention_mask=mask, labels=labels)
    ref_grads = grads(ref.loss, theirs)
    ours = PrefixEncoder(peft.peft_config["default"])
    ours.load_state_dict(theirs.state_dict())
    peft.prompt_encoder["default"] = ours
    out = peft(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
    assert_grads_close(grads(out.loss, ours), ref_grads, rtol=1e-6)
    with use_backend("triton"):
        fast = prefix_forward(base, ours, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- generate
@pytest.mark.peft_oracle
@pytest.mark.parametrize("name,projection", [("llama", True), ("gpt2", False)])
def test_greedy_generate_matches_peft(name, projection):
    peft, base, encoder, _ = peft_model(name, projection=projection)
    peft.eval()
    ids, mask, _ = batch("CAUSAL_LM", rows=2, length=5, pad_side="left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        ref = peft.generate(input_ids=ids, attention_mask=mask, **kw)
    with use_backend("triton"):
        got = prefix_generate(base, encoder, ids, mask, **kw)
    assert got.tolist() == ref.tolist()


@pytest.mark.peft_oracle
def test_beam_search_and_several_sequences_match_peft():
    """generate() repeats the rows for beams but not a cache passed in: the cache is built for them."""
    peft, base, encoder, _ = peft_model("llama", projection=True)
    peft.eval()
    ids, mask, _ = batch("CAUSAL_LM", rows=2, length=5, pad_side="left")
    for kw in (dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=2)):
        kw.update(max_new_tokens=4, pad_token_id=PAD)
        with torch.no_grad():
            torch.manual_seed(4)
            ref = peft.generate(input_ids=ids, attention_mask=mask, **kw)
        torch.manual_seed(4)
        got = prefix_generate(base, encoder, ids, mask, **kw)
        assert got.tolist() == ref.tolist()


# ----------------------------------------------------------------------------- padding and positions
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert_token"])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_padded_rows_equal_their_unpadded_run(name, pad_side):
    """With mask-derived positions a padded row computes exactly what it computes alone."""
    _, base, encoder, task = peft_model(name, projection=False)
    base.eval()
    ids, mask, _ = batch(task, pad_side=pad_side)
    with torch.no_grad():
        padded = prefix_forward(base, encoder, input_ids=ids, attention_mask=mask).logits[1]
        real = mask[1].bool()
        alone = prefix_forward(base, encoder, input_ids=ids[1:2, real]).logits[0]
    torch.testing.assert_close(padded[real], alone, rtol=1e-5, atol=1e-5)


def test_peft_position_mode_matches_peft_training_forward_with_left_padding():
    peft, base, encoder, task = peft_model("gpt2", projection=False)
    ids, mask, labels = batch(task, pad_side="left")
    ref = peft(input_ids=ids, attention_mask=mask, labels=labels)
    out = prefix_forward(base, encoder, input_ids=ids, attention_mask=mask, labels=labels, positions="peft")
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
    mask_mode = prefix_forward(base, encoder, input_ids=ids, attention_mask=mask, labels=labels)
    assert not torch.allclose(mask_mode.loss, ref.loss)  # PEFT's left-padded positions differ from generate()'s


# ----------------------------------------------------------------------------- beyond PEFT
@pytest.mark.parametrize("name", ["llama", "bert_cls"])
def test_gradient_checkpointing(name):
    """Same loss and prefix gradients with and without gradient checkpointing (PEFT raises)."""
    peft, base, encoder, task = peft_model(name, projection=True)
    ids, mask, labels = batch(task)
    base.train()
    with use_backend("triton"):
        plain = prefix_forward(base, encoder, input_ids=ids, attention_mask=mask, labels=labels)
        plain_grads = grads(plain.loss, encoder)
        base.gradient_checkpointing_enable()
        ckpt = prefix_forward(base, encoder, input_ids=ids, attention_mask=mask, labels=labels)
        ckpt_grads = grads(ckpt.loss, encoder)
    # transformers' guard against caches under checkpointing is back once the forward is done
    assert not any(getattr(m, "_can_checkpoint_with_cache", False) for m in base.modules())
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=1e-6, atol=0)
    assert_grads_close(ckpt_grads, plain_grads, rtol=1e-6)
    fresh = MODELS[name][0]()
    fresh.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="does not work with gradient checkpointing"):
        get_peft_model(fresh, PrefixTuningConfig(task_type=task, num_virtual_tokens=2))


def test_checkpointing_keeps_the_cache_for_the_call_only():
    """The switch that keeps the prefix cache in checkpointed layers holds in the calling thread
    only: another thread's forward, meanwhile, has transformers' guard (its caches dropped)."""
    from ptuning_fast.prefix_tuning.cache import keep_cache_under_checkpointing

    _, base, _, _ = peft_model("llama", projection=False)
    base.train()
    base.gradient_checkpointing_enable()
    layers = [m for m in base.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    assert layers
    seen = {}
    with keep_cache_under_checkpointing(base):
        seen["call"] = [bool(m._can_checkpoint_with_cache) for m in layers]
        other = threading.Thread(target=lambda: seen.update(other=[bool(m._can_checkpoint_with_cache) for m in layers]))
        other.start()
        other.join()
    seen["after"] = [bool(m._can_checkpoint_with_cache) for m in layers]
    assert all(seen["call"]) and not any(seen["other"]) and not any(seen["after"])


def test_checkpointed_prefix_training_from_two_threads_equals_sequential():
    """Two threads training two prefixes on one checkpointed model (forward and backward, with the
    layers recomputed in the backward) get exactly what the same calls get one after another."""
    _, base, first, task = peft_model("llama", projection=True, tokens=4, seed=0)
    _, _, second, _ = peft_model("llama", projection=False, tokens=2, seed=1, model=llama())
    base.train()
    base.gradient_checkpointing_enable()
    calls = [(encoder, batch(task, rows=2 + i % 2, seed=10 + i)) for i in range(6) for encoder in (first, second)]

    def run(encoder, inputs):
        ids, mask, labels = inputs
        loss = prefix_forward(base, encoder, input_ids=ids, attention_mask=mask, labels=labels).loss
        return loss.detach(), grads(loss, encoder)

    sequential = [run(*call) for call in calls]
    results = [None] * len(calls)

    def worker(which):
        for i in range(which, len(calls), 2):
            results[i] = run(*calls[i])

    threads = [threading.Thread(target=worker, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (loss, grad), (ref_loss, ref_grad) in zip(results, sequential):
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
        for g, r in zip(grad, ref_grad):
            torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_gpt2_checkpointing_drops_the_cache_and_says_so():
    _, base, encoder, task = peft_model("gpt2", projection=False)
    ids, mask, labels = batch(task)
    base.train()
    base.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="did not pass the prefix cache to layers"):
        prefix_forward(base, encoder, input_ids=ids, attention_mask=mask, labels=labels)


def test_bf16_model_with_fp32_adapter():
    """PEFT keeps the adapter in fp32 and casts its output; the cache is written in bf16 directly."""
    peft, base, encoder, task = peft_model("llama", projection=False)
    base.to(torch.bfloat16)
    assert encoder.embedding.weight.dtype == torch.float32
    ids, mask, labels = batch(task)
    ref = peft(input_ids=ids, attention_mask=mask, labels=labels)
    with use_backend("triton"):
        cache = build_prefix_cache(base, encoder, 3, seq_len=6)
        assert cache.layers[0].keys.dtype == torch.bfloat16
        out = prefix_forward(base, encoder, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)  # the same bf16 prefix: the same bits
    assert_grads_close(grads(out.loss, encoder), grads(ref.loss, encoder), rtol=1e-2)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mixed_adapters_equal_separate_runs(backend):
    """Rows of two adapters (4 and 2 virtual tokens, with and without projection) in one batch give
    each row the logits it gets alone, and each adapter the gradient of its own rows only."""
    _, base, first, task = peft_model("llama", projection=True, tokens=4, seed=0)
    _, _, second, _ = peft_model("llama", projection=False, tokens=2, seed=1, model=llama())
    base.eval()
    ids, mask, labels = batch(task, rows=4, seed=2)
    index = torch.tensor([1, 0, 1, 0])
    names = [("first", "second")[i] for i in index.tolist()]
    with use_backend(backend):
        mixed = prefix_forward(base, {"first": first, "second": second}, ids, mask, adapter_names=names)
        token_loss = F.cross_entropy(mixed.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        mixed_grads = torch.autograd.grad(token_loss, list(first.parameters()) + list(second.parameters()))
        alone_grads = []
        for n, encoder in enumerate((first, second)):
            rows = index == n
            alone = prefix_forward(base, encoder, input_ids=ids[rows], attention_mask=mask[rows])
            torch.testing.assert_close(mixed.logits[rows] * mask[rows, :, None], alone.logits * mask[rows, :, None],
                                       rtol=1e-5, atol=1e-5)
            loss = F.cross_entropy(alone.logits[:, :-1].flatten(0, 1), labels[rows, 1:].flatten(), reduction="sum")
            alone_grads += grads(loss, encoder)
    assert_grads_close(mixed_grads, alone_grads)


# ----------------------------------------------------------------------------- helpers and errors
def test_geometry_masks_positions_and_errors():
    assert tuple(prefix_geometry(llama())) == (2, 2, 8)
    assert tuple(prefix_geometry(qwen3().config)) == (2, 1, 12)
    assert tuple(prefix_geometry(gpt2())) == (2, 4, 8)
    with pytest.raises(ValueError, match="encoder-decoder"):
        prefix_geometry(T5Config(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4))
    _, base, encoder, _ = peft_model("llama", projection=False, tokens=3)
    cache = build_prefix_cache(base, encoder, 2)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    assert prefix_attention_mask(mask, cache).tolist() == [[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert prefix_attention_mask(None, cache) is None
    assert prefix_position_ids(mask, cache).tolist() == [[0, 3, 4], [3, 4, 0]]
    assert prefix_position_ids(mask, cache, positions="peft").tolist() == [[3, 4, 5], [3, 4, 5]]
    with pytest.raises(ValueError, match="`positions` must be one of"):
        prefix_position_ids(mask, cache, positions="left")
    with pytest.raises(ValueError, match="`attention_mask` has 3 rows but the cache has 2"):
        prefix_attention_mask(torch.ones(3, 2), cache)
    with pytest.raises(ValueError, match="encodes 64 values per virtual token"):
        build_prefix_cache(gpt2(), encoder, 2)  # a Llama adapter on GPT-2: 4 KV heads, not 2
    with pytest.raises(TypeError, match=r"`encoders\[0\]` must be a PrefixEncoder"):
        build_prefix_cache(base, torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="give exactly one of `input_ids` and `inputs_embeds`"):
        prefix_forward(base, encoder)
    with pytest.raises(ValueError, match="`positions` must be one of"):
        prefix_forward(base, encoder, input_ids=mask, positions="left")
    with pytest.raises(TypeError, match="`input_ids` must be a torch.Tensor, got list"):
        prefix_forward(base, encoder, input_ids=mask.tolist())
    with pytest.raises(TypeError, match="`input_ids` must have dtype in"):
        prefix_forward(base, encoder, input_ids=mask.float())
    with pytest.raises(ValueError, match="`inputs_embeds` must have 3 dimensions"):
        prefix_forward(base, encoder, inputs_embeds=torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(2, 5\) but the text is \(2, 3\)"):
        prefix_forward(base, encoder, input_ids=mask, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"`position_ids` has shape \(1, 3\) but the text is \(2, 3\)"):
        prefix_forward(base, encoder, input_ids=mask, position_ids=torch.arange(3)[None])
    with pytest.raises(TypeError, match="`position_ids` must have dtype in"):
        prefix_forward(base, encoder, input_ids=mask, position_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(2, 4\) but the text is \(2, 3\)"):
        prefix_generate(base, encoder, mask, torch.ones(2, 4, dtype=torch.long))
    two = {"a": encoder, "b": encoder}
    with pytest.raises(ValueError, match="`adapter_names` has 3 names for a batch of 2 rows"):
        prefix_generate(base, two, mask, adapter_names=["a", "b", "b"], num_beams=2)
    with pytest.raises(ValueError, match=r"`adapter_names`: unknown adapters \['c'\]; known: \['a', 'b'\]"):
        prefix_generate(base, two, mask, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="`adapter_names` is required with 2 adapters"):
        prefix_forward(base, two, mask)
    with pytest.raises(ValueError, match="the model's key_states are torch.float32 but the cache holds torch.bfloat16"):
        base(input_ids=mask, past_key_values=build_prefix_cache(base, encoder, 2, dtype=torch.bfloat16))


def test_deprecated_forms_still_work_and_warn():
    """The names before the one vocabulary (encoders first, `adapter_index`, `mode=`, prefix
    lengths): same results, with a DeprecationWarning naming the new form."""
    _, base, encoder, _ = peft_model("llama", projection=False, tokens=3)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    expected = build_prefix_cache(base, encoder, 2)
    with pytest.warns(DeprecationWarning, match="build_prefix_cache\\(model, encoders"):
        old = build_prefix_cache(encoder, base, 2)
    torch.testing.assert_close(old.buffer.storage, expected.buffer.storage, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="`mode` is deprecated; use `positions`"):
        assert prefix_position_ids(mask, old, mode="peft").tolist() == [[3, 4, 5], [3, 4, 5]]
    with pytest.raises(ValueError, match="`mode` must be one of"):
        prefix_position_ids(mask, old, mode="left")
    with pytest.warns(DeprecationWarning, match="prompt_lengths"):
        assert old.prefix_lengths().tolist() == [3, 3]
    with pytest.warns(DeprecationWarning, match="positions='continue'"):
        by_mask = prefix_forward(base, encoder, mask, mask, positions="mask").logits
    torch.testing.assert_close(by_mask, prefix_forward(base, encoder, mask, mask).logits, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="`adapter_index` is deprecated"):
        with pytest.raises(ValueError, match="`adapter_index` has 3 entries but batch_size is 2"):
            prefix_generate(base, [encoder, encoder], mask, adapter_index=torch.tensor([0, 1, 1]), num_beams=2)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        prefix_generate(base, [encoder, encoder], mask, adapter_index=torch.tensor([0, 2]))
    index = torch.tensor([1, 0])
    with pytest.warns(DeprecationWarning):
        by_index = prefix_forward(base, [encoder, encoder], mask, adapter_index=index).logits
    by_names = prefix_forward(base, {"a": encoder, "b": encoder}, mask, adapter_names=["b", "a"]).logits
    torch.testing.assert_close(by_index, by_names, rtol=0, atol=0)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("projection", [False, True])
def test_cuda_llama_matches_peft(projection):
    peft, base, encoder, task = peft_model("llama", projection=projection)
    peft.cuda()
    ids, mask, labels = (t.cuda() for t in batch(task))
    ref = peft(input_ids=ids, attention_mask=mask, labels=labels)
    ref_grads = grads(ref.loss, encoder)
    out = prefix_forward(base, encoder, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    assert_grads_close(grads(out.loss, encoder), ref_grads)
    with torch.no_grad():
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD)
        assert prefix_generate(base, encoder, ids, mask, **kw).tolist() == peft.generate(
            input_ids=ids, attention_mask=mask, **kw).tolist()
