"""``ptuning_fast.accelerate(peft_model)`` and ``patch_peft``: same logits, loss, gradients and
generated tokens as PEFT, with this package's encoders, prompt cache, prefix cache and mask."""
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder
from peft.tuners.prefix_tuning import PrefixEncoder as PeftPrefixEncoder
from tests.tiny_models import build, labels_for, prompt_configs, random_ids, randomize_

import ptuning_fast
from ptuning_fast.prefix_tuning.cache import PrefixKVCache
from ptuning_fast.hf.compat import get_cache
from ptuning_fast.peft_route import is_accelerated, is_peft_patched
from ptuning_fast.prefix_tuning.encoder import PrefixEncoder

T = 5
KINDS = prompt_configs(T)
MODEL_NAMES = ["llama", "gpt2", "llama_cls", "bert_cls", "bert_token", "bert_qa", "t5"]


def peft_model(name, kind, seed=0):
    base, task = build(name, seed)
    model = get_peft_model(base, KINDS[kind](task))
    randomize_(model.prompt_encoder, seed + 100)
    return model, task


def batch(task, seed, kind="prefix", size=3, length=7):
    ids = random_ids(size, length, seed)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded row: PEFT's own semantics must be kept for it too
    extra = labels_for(task, ids, seed + 1)
    if task == "TOKEN_CLS" and kind in ("mlp", "lstm"):
        extra = {}  # PEFT crashes on token-classification labels with P-tuning
    return {"input_ids": ids, "attention_mask": mask, **extra}


def run(model, inputs):
    out = model(**inputs)
    score = out.loss if out.get("loss") is not None else sum(v.float().pow(2).mean() for k, v in out.items()
                                                             if k.endswith("logits"))
    model.zero_grad(set_to_none=True)
    score.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, score.detach(), grads


@pytest.mark.peft_oracle
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_accelerate_keeps_logits_loss_and_gradients(name, kind):
    model, task = peft_model(name, kind)
    inputs = batch(task, seed=3, kind=kind)
    ref_out, ref_score, ref_grads = run(model, inputs)
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}

    assert ptuning_fast.accelerate(model) is model
    encoder = model.prompt_encoder["default"]
    assert isinstance(encoder, ptuning_fast.PromptEncoder if kind in ("mlp", "lstm") else PrefixEncoder)
    assert isinstance(encoder, PeftPromptEncoder if kind in ("mlp", "lstm") else PeftPrefixEncoder)
    # The very same Parameter objects: optimizers built before accelerate() keep working.
    assert all(p is parameters[n] for n, p in model.named_parameters() if p.requires_grad)

    out, score, grads = run(model, inputs)
    torch.testing.assert_close(score, ref_score, rtol=1e-6, atol=1e-6)
    for key, value in ref_out.items():
        if isinstance(value, torch.Tensor) and key != "loss":
            torch.testing.assert_close(out[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert set(grads) == set(ref_grads) and len(grads) >= 1
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.peft_oracle
@pytest.mark.parametrize("kind", ["mlp", "prefix"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_accelerate_keeps_generated_tokens(name, kind):
    model, task = peft_model(name, kind, seed=1)
    model.eval()
    ids = random_ids(2, 6, 11)
    mask = torch.ones_like(ids)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    reference = model.generate(input_ids=ids, attention_mask=mask, **settings)
    ptuning_fast.accelerate(model)
    got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got, reference)


def test_optimizer_built_before_accelerate_still_trains():
    model, task = peft_model("gpt2", "mlp")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ptuning_fast.accelerate(model)
    before = {n: p.detach().clone() for n, p in model.prompt_encoder.named_parameters()}
    inputs = batch(task, seed=4, kind="mlp")
    model(**inputs).loss.backward()
    optimizer.step()
    changed = [n for n, p in model.prompt_encoder.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_prompts_are_broadcast_and_never_stale():
    model, _ = peft_model("llama", "mlp")
    ptuning_fast.accelerate(model)
    model.eval()
    with torch.no_grad():
        first = model.get_prompt(4)
        expected = model.prompt_encoder["default"](torch.arange(T)[None])[0]
    assert first.shape == (4, T, 32) and first.stride(0) == 0  # one encoded prompt, broadcast
    torch.testing.assert_close(first[3], expected, rtol=0, atol=0)
    kept = first[0].clone()
    model.prompt_encoder["default"].embedding.weight.data.add_(1.0)  # no version bump: still seen
    with torch.no_grad():
        second = model.get_prompt(4)
    assert not torch.equal(second[0], kept)


@pytest.mark.parametrize("name", ["llama", "bert_cls"])
def test_prefix_goes_through_fused_cache_and_mask(name):
    model, task = peft_model(name, "prefix")
    ptuning_fast.accelerate(model)
    seen = {}

    def spy(module, args, kwargs):
        seen["cache"], seen["mask"] = get_cache(kwargs), kwargs.get("attention_mask")

    # PEFT runs BERT's classification heads through the backbone alone: watch the attention's caller.
    watched = model.get_base_model()
    watched = watched.bert if name.startswith("bert") else watched
    handle = watched.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        model(**batch(task, seed=5))
    finally:
        handle.remove()
    assert isinstance(seen["cache"], PrefixKVCache)
    if name == "llama":  # a causal prefix always needs a 4D mask: the fused mask builder's (sdpa)
        assert seen["mask"].dim() == 4 and seen["mask"].dtype == torch.bool
    else:  # bidirectional: the 2D mask as PEFT hands it (BERT passes none to SDPA where nothing is masked)
        assert seen["mask"].dim() == 2
    assert seen["mask"].shape[-1] == T + 7


def test_patch_peft_builds_accelerated_models_and_unpatch_restores(tmp_path):
    base, task = build("llama")
    config = KINDS["mlp"](task)
    assert not is_peft_patched()
    with ptuning_fast.peft_patched():
        assert is_peft_patched()
        fast = get_peft_model(base, config)
        assert isinstance(fast.prompt_encoder["default"], ptuning_fast.PromptEncoder) and is_accelerated(fast)
    assert not is_peft_patched()
    base2, _ = build("llama")
    plain = get_peft_model(base2, KINDS["mlp"](task))
    assert type(plain.prompt_encoder["default"]) is PeftPromptEncoder and not is_accelerated(plain)

    # from_pretrained under the patch: PEFT's saved adapter, our encoder, PEFT's logits.
    randomize_(plain.prompt_encoder, 7)
    plain.save_pretrained(tmp_path)
    inputs = {"input_ids": random_ids(2, 5, 8)}
    base3, _ = build("llama")
    loaded_plain = PeftModel.from_pretrained(base3, tmp_path)
    ptuning_fast.patch_peft()
    try:
        base4, _ = build("llama")
        loaded_fast = PeftModel.from_pretrained(base4, tmp_path)
    finally:
        ptuning_fast.unpatch_peft()
    assert isinstance(loaded_fast.prompt_encoder["default"], ptuning_fast.PromptEncoder)
    torch.testing.assert_close(loaded_fast(**inputs).logits, loaded_plain(**inputs).logits, rtol=0, atol=0)


@pytest.mark.peft_oracle
def test_accelerate_twice_is_harmless():
    model, task = peft_model("bert_cls", "prefix")
    inputs = batch(task, seed=6)
    reference = model(**inputs).logits
    ptuning_fast.accelerate(model)
    ptuning_fast.accelerate(model)
    torch.testing.assert_close(model(**inputs).logits, reference, rtol=1e-6, atol=1e-6)


def test_accelerate_errors():
    with pytest.raises(TypeError, match="peft_model.*PeftModel"):
        ptuning_fast.accelerate(torch.nn.Linear(2, 2))
    base, _ = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = get_peft_model(base, LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match="no prompt-learning adapter"):
        ptuning_fast.accelerate(lora)


@pytest.mark.parametrize("kind", ["mlp", "prefix_proj"])
def test_kernels_give_peft_numbers(kind):
    """The accelerated model on the Triton kernels (CUDA, or Triton's interpreter on CPU)."""
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, task = peft_model("llama", kind)
    model.to(device)
    inputs = {k: v.to(device) for k, v in batch(task, seed=12, kind=kind).items()}
    ref_out, ref_score, ref_grads = run(model, inputs)
    ptuning_fast.accelerate(model)
    with ptuning_fast.use_backend("triton"):
        out, score, grads = run(model, inputs)
        generated = model.generate(input_ids=inputs["input_ids"][1:], max_new_tokens=2, do_sample=False,
                                   pad_token_id=0)
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-6)
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    assert generated.shape == (2, 9)


def qwen3_causal_lm():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.tiny_models import PAD, VOCAB
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    return Qwen3ForCausalLM(config)


@pytest.mark.peft_oracle
@pytest.mark.parametrize("kind", ["mlp", "prefix"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3"])
def test_accelerate_keeps_left_padded_generation(name, kind):
    """A left-padded batch: PEFT's generate() numbers every column for v1 prompts (padding
    included) and real tokens for deep prompts; every step's logits and the tokens are PEFT's."""
    if name == "qwen3":
        torch.manual_seed(2)
        base, task = qwen3_causal_lm(), "CAUSAL_LM"
        model = get_peft_model(base, KINDS[kind](task))
        randomize_(model.prompt_encoder, 102, scale=2.0)
    else:
        model, task = peft_model(name, kind, seed=2)
        randomize_(model.prompt_encoder, 102, scale=2.0)
    model.eval()
    ids = random_ids(3, 7, 12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                    return_dict_in_generate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Position ids are not supported ... Ignoring position ids."
        reference = model.generate(input_ids=ids, attention_mask=mask, **settings)
    ptuning_fast.accelerate(model)
    got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got.sequences, reference.sequences)
    assert len(got.logits) == len(reference.logits) == 5
    for step, (a, b) in enumerate(zip(got.logits, reference.logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")


@pytest.mark.peft_oracle
@pytest.mark.parametrize("kind", ["mlp", "prefix"])
def test_disable_adapter_turns_the_prompt_off_in_generate(kind):
    model, _ = peft_model("llama", kind, seed=3)
    randomize_(model.prompt_encoder, 103, scale=2.0)  # a prompt strong enough to change the tokens
    model.eval()
    ids = random_ids(2, 6, 13)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with model.disable_adapter():
            reference = model.generate(input_ids=ids, attention_mask=mask, **settings)
    base_tokens = model.get_base_model().generate(input_ids=ids, attention_mask=mask, **settings)
    ptuning_fast.accelerate(model)
    prompted = model.generate(input_ids=ids, attention_mask=mask, **settings)
    with model.disable_adapter():
        got = model.generate(input_ids=ids, attention_mask=mask, **settings)
        logits = model(input_ids=ids, attention_mask=mask).logits
        with pytest.raises(ValueError, match="adapter_names.*disable_adapter"):
            model.generate(input_ids=ids, attention_mask=mask, adapter_names=["default"] * 2, **settings)
    assert torch.equal(got, reference) and torch.equal(got, base_tokens)
    assert not torch.equal(prompted, got)
    torch.testing.assert_close(logits, model.get_base_model()(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **settings), prompted)  # on again
