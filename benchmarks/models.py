"""Base models for the end-to-end benchmarks, built from configs (random weights, no download).

Three sizes (:data:`benchmarks.common.SIZES`): ``gpu`` follows the issue's two regimes, NLU
(BERT-base, T=20, S=128, B=32) and LLM (Llama-7B-like layer dims with two layers, T=64, S=512,
B=4); ``cpu`` is realistic for a CPU (NLU: MiniLM-L6's dims, the embedded demo model; LLM: a
4-layer Llama of width 512), T=20; ``tiny`` is a two-layer width-64 model (CI, ``--quick``).
"""
from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM


def nlu_model(size: str):
    if size == "tiny":
        config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config), dict(batch=4, seq=32, tokens=8)
    if size == "cpu":  # MiniLM-L6's dims
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config), dict(batch=8, seq=64, tokens=20)
    config = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # BERT-base dims
    return BertForSequenceClassification(config), dict(batch=32, seq=128, tokens=20)


def llm_model(size: str):
    if size == "tiny":
        config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return LlamaForCausalLM(config), dict(batch=2, seq=32, tokens=8)
    if size == "cpu":
        config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
        return LlamaForCausalLM(config), dict(batch=4, seq=128, tokens=20)
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
    return LlamaForCausalLM(config), dict(batch=4, seq=512, tokens=64)


def frozen_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def inputs(model, shape: dict, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (shape["batch"], shape["seq"]), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : shape["seq"] // 4] = 0  # one left-padded row: masks and positions are exercised
    return ids.to(device), mask.to(device)
