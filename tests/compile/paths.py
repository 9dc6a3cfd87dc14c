"""The paths a user runs, built small: the accelerated PeftModel and the native model, with v1
prompts (P_TUNING, MLP encoder) and deep prompts (PREFIX_TUNING), on a tiny Llama; and their
inputs: a left-padded batch with fresh random tokens."""
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

import ptuning_fast
from tests.tiny_models import PAD, VOCAB, bert, llama

KINDS = ("v1", "deep")
ROUTES = ("accelerated", "native")
NUM_VIRTUAL_TOKENS = 5


def config(kind: str):
    if kind == "v1":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS,
                                   encoder_hidden_size=24)
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS)


def build(kind: str, route: str, seed: int = 0):
    """``route``: "accelerated" (ptuning_fast.accelerate(PeftModel)), "native"
    (get_ptuning_model) or "peft" (plain PEFT)."""
    torch.manual_seed(seed)
    base = llama()
    if route == "native":
        return ptuning_fast.get_ptuning_model(base, config(kind))
    model = get_peft_model(base, config(kind))
    return ptuning_fast.accelerate(model) if route == "accelerated" else model


def batch(batch_size: int = 3, seq_len: int = 7, seed: int = 1, padded: bool = True):
    """(input_ids, attention_mask): random tokens, the later rows left-padded by 1, 2... tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        for row in range(1, batch_size):
            attention_mask[row, :row] = 0
            input_ids[row, :row] = PAD
    return input_ids, attention_mask


def prompt_parameters(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


MIXED_LENGTHS = {"equal": (3, 3, 3), "unequal": (4, 1, 3)}
MIXED_ROWS = ["b", "a", "c"]  # one adapter name per row of batch()


def build_mixed(kind: str, route: str, lengths: str = "unequal", seed: int = 0):
    """A causal LM with three adapters a, b and c (``MIXED_LENGTHS[lengths]`` virtual tokens), for
    mixed batches (``adapter_names=MIXED_ROWS``); ``route`` as in :func:`build`."""
    torch.manual_seed(seed)
    base = llama()
    model = None
    for name, tokens in zip("abc", MIXED_LENGTHS[lengths]):
        cfg = (PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, encoder_hidden_size=24)
               if kind == "v1" else PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens))
        if model is None:
            model = (ptuning_fast.get_ptuning_model(base, cfg, adapter_name=name) if route == "native"
                     else get_peft_model(base, cfg, adapter_name=name))
        else:
            model.add_adapter(name, cfg)
    return ptuning_fast.accelerate(model) if route == "accelerated" else model


def build_mixed_heads(kind: str, seed: int = 0):
    """An accelerated sequence classifier (a tiny BERT) with adapters a, b and c of
    ``MIXED_LENGTHS["unequal"]`` virtual tokens, each with its own classifier copy (PEFT's
    ``modules_to_save``), for mixed batches (``adapter_names=MIXED_ROWS``)."""
    torch.manual_seed(seed)
    model = None
    for name, tokens in zip("abc", MIXED_LENGTHS["unequal"]):
        cfg = (PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens, encoder_hidden_size=24)
               if kind == "v1" else PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens))
        if model is None:
            model = get_peft_model(bert(num_labels=3), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return ptuning_fast.accelerate(model)
