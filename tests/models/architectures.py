"""Tiny random transformers models of many architectures (hidden 32, 2 layers, vocabulary 61),
built from their configs: the coverage matrix's models. Dropout is off everywhere."""
import torch
import transformers

VOCAB = 61
PAD = 0

# The common shape of every config, under each family's own names.
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
_NO_GQA = {**_LLAMA_LIKE, "num_key_value_heads": 4}
_BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=44,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  pad_token_id=PAD)
_GPT2_LIKE = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
_MOE = dict(num_local_experts=2, num_experts_per_tok=1)


# name -> (config class, model class, config keywords, PEFT task type)
ARCHITECTURES = {
    # causal LMs
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE, "CAUSAL_LM"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_LLAMA_LIKE, "sliding_window": 48}, "CAUSAL_LM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_LLAMA_LIKE, **_MOE}, "CAUSAL_LM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE, "CAUSAL_LM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}, "CAUSAL_LM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {**_LLAMA_LIKE, "head_dim": 8, "num_experts": 2, "num_experts_per_tok": 1,
                   "moe_intermediate_size": 20, "decoder_sparse_step": 1}, "CAUSAL_LM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}, "CAUSAL_LM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 48},
               "CAUSAL_LM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 48},
               "CAUSAL_LM"),
    "phi": ("PhiConfig", "PhiForCausalLM", {**_NO_GQA, "resid_pdrop": 0.0, "embd_pdrop": 0.0}, "CAUSAL_LM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _LLAMA_LIKE, "CAUSAL_LM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**_NO_GQA, "hidden_dropout": 0.0, "attention_dropout": 0.0},
                 "CAUSAL_LM"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {**_GPT2_LIKE, "rotary_dim": 4}, "CAUSAL_LM"),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=44, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                 pad_token_id=PAD, bos_token_id=1, eos_token_id=2), "CAUSAL_LM"),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=2),
               "CAUSAL_LM"),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0,
                   pad_token_id=PAD, bos_token_id=1, eos_token_id=2), "CAUSAL_LM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _GPT2_LIKE, "CAUSAL_LM"),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", _GPT2_LIKE, "CAUSAL_LM"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {**_LLAMA_LIKE, "hidden_dropout": 0.0}, "CAUSAL_LM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _LLAMA_LIKE, "CAUSAL_LM"),
    "cohere": ("CohereConfig", "CohereForCausalLM", _LLAMA_LIKE, "CAUSAL_LM"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM",
                   {**_LLAMA_LIKE, "residual_dropout": 0.0, "embedding_dropout": 0.0, "sliding_window": None},
                   "CAUSAL_LM"),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", {**_GPT2_LIKE, "n_ctx": 64, "rotary_dim": 4}, "CAUSAL_LM"),
    # sequence-classification heads on decoders
    "llama_cls": ("LlamaConfig", "LlamaForSequenceClassification", {**_LLAMA_LIKE, "num_labels": 3}, "SEQ_CLS"),
    "qwen2_cls": ("Qwen2Config", "Qwen2ForSequenceClassification", {**_LLAMA_LIKE, "num_labels": 3}, "SEQ_CLS"),
    "gemma2_cls": ("Gemma2Config", "Gemma2ForSequenceClassification",
                   {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 48, "num_labels": 3}, "SEQ_CLS"),
    "gpt2_cls": ("GPT2Config", "GPT2ForSequenceClassification", {**_GPT2_LIKE, "num_labels": 3}, "SEQ_CLS"),
    # encoders
    "bert": ("BertConfig", "BertForSequenceClassification", {**_BERT_LIKE, "num_labels": 3}, "SEQ_CLS"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                {**_BERT_LIKE, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "num_labels": 3}, "SEQ_CLS"),
    "xlm_roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification",
                    {**_BERT_LIKE, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "num_labels": 3},
                    "SEQ_CLS"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=44, max_position_embeddings=64,
                        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=PAD,
                        num_labels=3), "SEQ_CLS"),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification",
                {**_BERT_LIKE, "embedding_size": 32, "num_labels": 3}, "SEQ_CLS"),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   {**_BERT_LIKE, "num_labels": 3, "pooler_dropout": 0.0}, "SEQ_CLS"),
    # seq2seq
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=44, num_layers=2, num_heads=4, dropout_rate=0.0,
                decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=1), "SEQ_2_SEQ_LM"),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=44, decoder_ffn_dim=44, max_position_embeddings=64,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                  eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None), "SEQ_2_SEQ_LM"),
}


# Prompt-config fields PEFT cannot read off the model's config (DistilBERT names them ``dim``,
# ``n_layers``, ``n_heads``), given as a user of PEFT must give them.
PROMPT_CONFIG_FIELDS = {"distilbert": dict(token_dim=32, num_layers=2, num_attention_heads=4)}


DECODER_HEADS = ("llama_cls", "qwen2_cls", "gemma2_cls", "gpt2_cls")  # classification heads on decoders


def task_of(name: str) -> str:
    return ARCHITECTURES[name][3]


def pad_token_of(name: str) -> int:
    return ARCHITECTURES[name][2].get("pad_token_id", PAD)


def is_causal_lm(name: str) -> bool:
    return task_of(name) == "CAUSAL_LM"


def padding_side(name: str) -> str:
    """The side the model's users pad: left for decoder-only models (generation appends on the
    right, the sequence-classification head reads the last real token), right otherwise."""
    return "left" if task_of(name) == "CAUSAL_LM" or name in DECODER_HEADS else "right"


def build_base(name: str, seed: int = 0):
    """The tiny model, in eval mode (no dropout), its weights drawn from ``seed``."""
    config_name, model_name, kwargs, _ = ARCHITECTURES[name]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()

