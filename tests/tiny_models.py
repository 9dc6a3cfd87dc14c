"""Tiny transformers models built from configs (no download) for the integration tests.

Dropout is off everywhere so that train-mode runs are deterministic; sizes are odd on purpose.
"""
import torch
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 61
PAD = 0


def llama(cls=LlamaForCausalLM, **kw):
    """Llama with grouped-query attention (4 query heads, 2 KV heads)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **kw)
    return cls(config)


class LlamaWithoutPositionIds(LlamaForCausalLM):
    """A causal LM whose forward names no ``position_ids`` (as some architectures): it computes
    positions itself, from the cache length."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        kwargs.pop("position_ids", None)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, **kwargs)


def mistral(**kw):
    """Mistral with a sliding window: its layers build their own masks (no fused 4D mask)."""
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           sliding_window=48, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **kw)
    return MistralForCausalLM(config)


def gpt2(**kw):
    """GPT-2: learned absolute positions, so position mistakes change the outputs."""
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, **kw)
    return GPT2LMHeadModel(config)


def bert(cls=BertForSequenceClassification, **kw):
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=44, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=PAD, **kw)
    return cls(config)


def t5(**kw):
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=44, num_layers=2, num_heads=4, dropout_rate=0.0,
                      decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=1, **kw)
    return T5ForConditionalGeneration(config)


# name -> (builder, PEFT task type)
MODELS = {
    "llama": (llama, "CAUSAL_LM"),
    "llama_without_position_ids": (lambda: llama(LlamaWithoutPositionIds), "CAUSAL_LM"),
    "mistral": (mistral, "CAUSAL_LM"),
    "gpt2": (gpt2, "CAUSAL_LM"),
    "llama_cls": (lambda: llama(LlamaForSequenceClassification, num_labels=3), "SEQ_CLS"),
    "bert_cls": (lambda: bert(BertForSequenceClassification, num_labels=3), "SEQ_CLS"),
    "bert_token": (lambda: bert(BertForTokenClassification, num_labels=4), "TOKEN_CLS"),
    "bert_qa": (lambda: bert(BertForQuestionAnswering), "QUESTION_ANS"),
    "t5": (t5, "SEQ_2_SEQ_LM"),
}


def build(name, seed=0):
    builder, task = MODELS[name]
    torch.manual_seed(seed)
    return builder(), task


def random_ids(batch, length, seed, low=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, length), generator=g)


def labels_for(task, input_ids, seed):
    """Fresh random labels of the right kind for ``task``."""
    g = torch.Generator().manual_seed(seed)
    batch, length = input_ids.shape
    if task == "CAUSAL_LM":
        return {"labels": input_ids.clone()}
    if task == "SEQ_CLS":
        return {"labels": torch.randint(0, 3, (batch,), generator=g)}
    if task == "TOKEN_CLS":
        return {"labels": torch.randint(0, 4, (batch, length), generator=g)}
    if task == "QUESTION_ANS":
        start = torch.randint(0, length - 1, (batch,), generator=g)
        return {"start_positions": start, "end_positions": start + 1}
    if task == "SEQ_2_SEQ_LM":
        return {"labels": torch.randint(3, VOCAB, (batch, 4), generator=g)}
    raise ValueError(task)


def randomize_(module, seed, scale=0.5):
    """Fresh random values for every parameter of ``module`` (not its init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def prompt_configs(num_virtual_tokens):
    """One config factory per prompt kind (each takes the task type), ``num_virtual_tokens`` long."""
    from peft import PrefixTuningConfig, PromptEncoderConfig

    T = num_virtual_tokens
    return {
        "mlp": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=T, encoder_hidden_size=20),
        "lstm": lambda task: PromptEncoderConfig(task_type=task, num_virtual_tokens=T, encoder_hidden_size=12,
                                                 encoder_reparameterization_type="LSTM"),
        "prefix": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=T),
        "prefix_proj": lambda task: PrefixTuningConfig(task_type=task, num_virtual_tokens=T, prefix_projection=True,
                                                       encoder_hidden_size=24),
    }


def padded_batch(lengths, width, seed, side):
    """Random ids with each row's ``lengths[b]`` real tokens on the left or right of ``width``
    columns, the rest ``PAD``; returns (ids, mask)."""
    ids = random_ids(len(lengths), width, seed)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, width - n:] = 1
        else:
            mask[row, :n] = 1
    return ids * mask + PAD * (1 - mask), mask


def train_steps(model, optimizer, inputs, steps):
    """``steps`` optimizer steps of ``model(**inputs).loss`` on one batch: the losses, (steps,)."""
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)
