"""No encoded prompt outlives the weights it came from.

Every way of changing a prompt parameter (fused and foreach optimizer steps, ``.data`` writes,
``param.data = ...``, ``vector_to_parameters``, ``load_state_dict``, PEFT's
``set_peft_model_state_dict``, an ``AveragedModel`` update) is applied after a warm eval call;
the next forward, ``generate()`` and saved adapter must then equal those of a fresh module loaded
with the same state. Fused steps and ``.data`` writes bump no version counter, so a cache keyed on
version counters would fail here. Also a Hugging Face ``Trainer`` run with its default (fused)
optimizer: ``evaluate()`` after ``train()`` equals a plain PEFT twin's.
"""
import copy
import warnings

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

import ptuning_fast
from ptuning_fast import PrefixEncoder, PromptEncoder, get_ptuning_model, save_adapter
from tests.tiny_models import PAD, build, prompt_configs, random_ids, randomize_

T = 4
KINDS = prompt_configs(T)


# ---------------------------------------------------------------------------------------------
# Subjects: a module holding prompt parameters, and what is compared
# ---------------------------------------------------------------------------------------------
def _encoder(kind):
    def make():
        base, task = build("llama")
        peft_model = get_peft_model(base, KINDS[kind](task))  # PEFT fills token_dim & co. from the model
        config = peft_model.peft_config["default"]
        encoder = (PromptEncoder if kind in ("mlp", "lstm") else PrefixEncoder)(config)
        randomize_(encoder, 3, scale=0.3)
        return encoder

    def run(encoder):
        indices = torch.arange(T).expand(3, -1)
        return {"out": encoder(indices)}

    return make, run


def _model(kind, route, generate=False):
    ids = random_ids(3, 5, 21)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0

    def make():
        base, task = build("llama")
        if route == "peft":
            model = ptuning_fast.accelerate(get_peft_model(base, KINDS[kind](task)))
        else:
            model = get_ptuning_model(base, KINDS[kind](task))
        randomize_(model.prompt_encoder, 4, scale=1.0)
        return model

    def run(model):
        if generate:
            return {"tokens": model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                             pad_token_id=PAD)}
        return {"logits": model(input_ids=ids, attention_mask=mask).logits}

    return make, run


SUBJECTS = {
    "prompt_encoder_mlp": _encoder("mlp"),
    "prompt_encoder_lstm": _encoder("lstm"),
    "prefix_encoder": _encoder("prefix"),
    "prefix_encoder_projection": _encoder("prefix_proj"),
    "peft_v1": _model("mlp", "peft"),
    "peft_deep": _model("prefix_proj", "peft"),
    "peft_v1_generate": _model("mlp", "peft", generate=True),
    "native_v1": _model("mlp", "native"),
    "native_deep": _model("prefix_proj", "native"),
    "native_v1_generate": _model("lstm", "native", generate=True),
    "native_deep_generate": _model("prefix", "native", generate=True),
}


def prompt_parameters(module):
    owner = module.prompt_encoder if hasattr(module, "prompt_encoder") else module
    return [p for p in owner.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Mutations: each changes the prompt parameters; returns the module to evaluate next
# ---------------------------------------------------------------------------------------------
def _optimizer_step(make_optimizer):
    def mutate(module, run, make):
        params = prompt_parameters(module)
        optimizer = make_optimizer(params)
        module.train()
        with torch.enable_grad():
            outputs = run_for_loss(module, run)
            loss = sum(v.float().pow(2).mean() for v in outputs)
            loss.backward()
        optimizer.step()
        module.eval()
        return module

    return mutate


def run_for_loss(module, run):
    if hasattr(module, "prompt_encoder"):  # a model: a forward with labels trains every prompt parameter
        ids = random_ids(2, 5, 31)
        return [module(input_ids=ids, labels=ids).loss]
    return list(run(module).values())


def _data_add(module, run, make):
    with torch.no_grad():
        for p in prompt_parameters(module):
            p.data.add_(0.25)
    return module


def _data_assign(module, run, make):
    for p in prompt_parameters(module):
        p.data = p.data * 1.5 + 0.1
    return module


def _vector_to_parameters(module, run, make):
    params = prompt_parameters(module)
    vector = torch.nn.utils.parameters_to_vector(params)
    torch.nn.utils.vector_to_parameters(vector * -0.5 + 0.05, params)
    return module


def _load_state_dict(module, run, make):
    other = make()
    randomize_(other.prompt_encoder if hasattr(other, "prompt_encoder") else other, 99, scale=0.5)
    module.load_state_dict(other.state_dict())
    return module


def _set_peft_model_state_dict(module, run, make):
    other = make()
    randomize_(other.prompt_encoder, 98, scale=0.5)
    # PEFT's state dict of a prompt adapter is its embedding table, loaded into `embedding.weight`.
    set_peft_model_state_dict(module, {"prompt_embeddings": other.prompt_encoder["default"].embedding.weight})
    return module


def _averaged_model(module, run, make):
    """The evaluated module is an AveragedModel's copy; update_parameters changes it in place."""
    averaged = torch.optim.swa_utils.AveragedModel(module, use_buffers=False)
    averaged.module.eval()
    with torch.no_grad():
        run(averaged.module)  # warm call on the averaged copy
        for p in prompt_parameters(module):
            p.add_(0.5)
    averaged.update_parameters(module)  # the second model seen: the average moves to (old + new) / 2
    return averaged.module


MUTATIONS = {
    "adamw_fused": _optimizer_step(lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True)),
    "adam_foreach": _optimizer_step(lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True)),
    "sgd_fused": _optimizer_step(lambda ps: torch.optim.SGD(ps, lr=0.5, fused=True)),
    "data_add": _data_add,
    "data_assign": _data_assign,
    "vector_to_parameters": _vector_to_parameters,
    "load_state_dict": _load_state_dict,
    "set_peft_model_state_dict": _set_peft_model_state_dict,
    "averaged_model": _averaged_model,
}


# set_peft_model_state_dict is PEFT's, for PeftModels only
PAIRS = [(s, m) for s in SUBJECTS for m in MUTATIONS if m != "set_peft_model_state_dict" or s.startswith("peft")]


@pytest.mark.parametrize("subject,mutation", PAIRS)
def test_every_change_reaches_the_next_call(subject, mutation):
    make, run = SUBJECTS[subject]
    module = make().eval()
    with torch.no_grad():
        before = {k: v.clone() for k, v in run(module).items()}  # the warm call
    module = MUTATIONS[mutation](module, run, make)
    fresh = make().eval()
    fresh.load_state_dict(module.state_dict())
    with torch.no_grad():
        after, expected = run(module), run(fresh)
    for key, value in expected.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    if not subject.endswith("generate"):  # greedy tokens may happen not to change
        assert any(not torch.equal(after[k], before[k]) for k in after), "the mutation changed nothing"
    if hasattr(module, "prompt_encoder"):  # the saved adapter holds the new prompts too
        assert_same_saved_adapter(module, fresh)


def assert_same_saved_adapter(module, fresh):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        save_adapter(module, f"{folder}/a")
        save_adapter(fresh, f"{folder}/b")
        got = load_file(f"{folder}/a/adapter_model.safetensors")["prompt_embeddings"]
        expected = load_file(f"{folder}/b/adapter_model.safetensors")["prompt_embeddings"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Frozen serving: the explicit opt-in
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "prefix_proj"])
def test_freeze_prompts_keeps_what_it_promises(kind, tmp_path):
    base, task = build("llama")
    model = get_ptuning_model(base, KINDS[kind](task))
    randomize_(model.prompt_encoder, 5)
    model.eval()
    ids = random_ids(2, 5, 22)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    trainable = model.prompt_encoder["default"]
    model.freeze_prompts()
    frozen = model.prompt_encoder["default"]
    assert frozen is not trainable and not any(p.requires_grad for p in frozen.parameters())
    assert model.peft_config["default"].inference_mode
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)
        for p in trainable.parameters():  # the trainable encoder, kept aside, changes...
            p.add_(1.0)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)  # ...not served
    model.save_pretrained(tmp_path)  # the frozen prompts are what is saved: PEFT's inference format
    reloaded = ptuning_fast.PTuningModel.from_pretrained(build("llama")[0].eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)
    model.unfreeze_prompts()
    assert model.prompt_encoder["default"] is trainable and not model.peft_config["default"].inference_mode
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, expected)  # the changed encoder serves again
    with pytest.raises(ValueError, match="adapter_names.*unknown adapter 'x'"):
        model.freeze_prompts(["x"])


# ---------------------------------------------------------------------------------------------
# The Hugging Face Trainer with its default optimizer
# ---------------------------------------------------------------------------------------------
def test_trainer_evaluate_after_train_equals_a_plain_peft_twin(tmp_path):
    from transformers import Trainer, TrainingArguments

    def run(accelerated):
        base, task = build("bert_cls")
        torch.manual_seed(0)
        model = get_peft_model(base, KINDS["mlp"](task))
        if accelerated:
            model = ptuning_fast.accelerate(model)
        g = torch.Generator().manual_seed(1)
        data = [{"input_ids": random_ids(1, 6, 100 + i)[0], "attention_mask": torch.ones(6, dtype=torch.long),
                 "labels": torch.randint(0, 3, (), generator=g)} for i in range(16)]
        args = TrainingArguments(str(tmp_path / f"run{int(accelerated)}"), per_device_train_batch_size=8,
                                 per_device_eval_batch_size=8, learning_rate=5e-2, num_train_epochs=2, report_to=[],
                                 save_strategy="no", use_cpu=True, seed=0, data_seed=0)
        assert "fused" in str(args.optim).lower()  # the default optimizer: fused AdamW
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
            before = trainer.evaluate()["eval_loss"]
            trainer.train()
            after = trainer.evaluate()["eval_loss"]
        model.save_pretrained(tmp_path / f"adapter{int(accelerated)}")
        return before, after

    plain_before, plain_after = run(False)
    fast_before, fast_after = run(True)
    assert fast_after != pytest.approx(fast_before, rel=1e-3)  # training changed what evaluate() sees
    assert fast_before == pytest.approx(plain_before, rel=1e-5)
    assert fast_after == pytest.approx(plain_after, rel=1e-4)
    saved = [load_file(tmp_path / f"adapter{i}" / "adapter_model.safetensors")["prompt_embeddings"] for i in (0, 1)]
    torch.testing.assert_close(saved[1], saved[0], rtol=1e-4, atol=1e-5)


def test_training_over_frozen_prompts_names_the_cause():
    """A training forward after freeze_prompts() with nothing trainable says so (instead of torch's
    "element 0 of tensors does not require grad" at backward); a head trained beside the frozen
    prompts, and forwards that do not train, keep working."""
    base, task = build("bert_cls")
    model = get_ptuning_model(base, KINDS["mlp"](task))
    randomize_(model.prompt_encoder, 6)
    ids = random_ids(2, 5, 23)
    labels = torch.tensor([0, 2])
    model.freeze_prompts()
    model.train()
    with pytest.raises(RuntimeError, match=r"freeze_prompts\(\).*unfreeze_prompts\(\)"):
        model(input_ids=ids, labels=labels)
    with torch.no_grad():  # not training: allowed
        served = model(input_ids=ids, labels=labels).logits
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, labels=labels).logits, served, rtol=0, atol=0)
    model.train()
    head = model.base_model.classifier.weight
    head.requires_grad_(True)  # a head trained over the frozen prompts: the prompts get no gradient
    model(input_ids=ids, labels=labels).loss.backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())
    head.requires_grad_(False)
    model.unfreeze_prompts()  # the fix the error names
    model(input_ids=ids, labels=labels).loss.backward()
    grads = [p.grad for p in model.prompt_encoder["default"].parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
