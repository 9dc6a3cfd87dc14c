"""The cases whose plain-PEFT outputs ``scripts/record_peft_reference.py`` records on the pinned
versions, and that ``tests/test_peft_reference.py`` checks on any transformers release: tiny
models from configs, several adapters each (deep prompts, and v1 for generate), left padding."""
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

from tests.tiny_models import build, padded_batch, randomize_

# name -> model, adapters (name, kind, num_virtual_tokens), the adapter of each row, what is checked
CASES = {
    "llama_cls_prefix": dict(model="llama_cls", adapters=[["a", "prefix", 4], ["b", "prefix_proj", 2]],
                             rows=["b", "a", "a"], check="forward"),
    "bert_cls_prefix": dict(model="bert_cls", adapters=[["a", "prefix", 3], ["b", "prefix_proj", 3]],
                            rows=["a", "b", "b"], check="forward"),
    "bert_token_prefix": dict(model="bert_token", adapters=[["a", "prefix_proj", 3]], rows=["a", "a"],
                              check="forward"),
    "bert_qa_prefix": dict(model="bert_qa", adapters=[["a", "prefix", 2]], rows=["a", "a"], check="forward"),
    "llama_prefix_generate": dict(model="llama", adapters=[["a", "prefix", 4], ["b", "prefix_proj", 1]],
                                  rows=["a", "b", "a"], check="generate"),
    "gpt2_prefix_generate": dict(model="gpt2", adapters=[["a", "prefix_proj", 3]], rows=["a", "a"],
                                 check="generate"),
    "llama_v1_generate": dict(model="llama", adapters=[["a", "mlp", 4], ["b", "mlp", 2]], rows=["a", "b", "b"],
                              check="generate"),
    "gpt2_v1_generate": dict(model="gpt2", adapters=[["a", "mlp", 3], ["b", "lstm", 2]], rows=["b", "a"],
                             check="generate"),
}


def _config(kind: str, tokens: int, task: str):
    if kind in ("mlp", "lstm"):
        return PromptEncoderConfig(task_type=task, num_virtual_tokens=tokens, encoder_hidden_size=12,
                                   encoder_reparameterization_type=kind.upper())
    return PrefixTuningConfig(task_type=task, num_virtual_tokens=tokens, prefix_projection=kind == "prefix_proj",
                              encoder_hidden_size=10)


def build_case(case: dict, seed: int = 0):
    """(plain PEFT model with the case's adapters and fresh random prompt and head weights, task)."""
    base, task = build(case["model"], seed)
    model = None
    for name, kind, tokens in case["adapters"]:
        config = _config(kind, tokens, task)
        if model is None:
            model = get_peft_model(base.eval(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    randomize_(model.prompt_encoder, seed + 50, scale=2.0)  # strong prompts: they steer the tokens
    g = torch.Generator().manual_seed(seed + 60)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "prompt_encoder" not in n:  # each adapter's head copy (modules_to_save)
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval(), task


def case_inputs(case: dict) -> dict:
    """Left-padded inputs (and labels for the forward checks) of the case's rows."""
    rows = len(case["rows"])
    ids, mask = padded_batch([6 - (r % 3) for r in range(rows)], 6, seed=5 + rows, side="left")
    inputs = {"input_ids": ids, "attention_mask": mask}
    if case["check"] == "generate":
        return inputs
    g = torch.Generator().manual_seed(9)
    if case["model"].endswith("_cls"):
        inputs["labels"] = torch.randint(0, 3, (rows,), generator=g)
    elif case["model"].endswith("_token"):
        inputs["labels"] = torch.randint(0, 4, (rows, 6), generator=g).masked_fill(mask == 0, -100)
    elif case["model"].endswith("_qa"):
        start = torch.randint(2, 5, (rows,), generator=g)
        inputs.update(start_positions=start, end_positions=start + 1)
    return inputs
