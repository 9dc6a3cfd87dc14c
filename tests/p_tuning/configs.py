"""The PEFT config both encoder test files build from (PEFT's own config class)."""
from peft import PromptEncoderConfig as PeftConfig


def make_config(tokens, dim, hidden, kind="MLP", submodules=1, **kw):
    base = dict(task_type="CAUSAL_LM", num_virtual_tokens=tokens, token_dim=dim, encoder_hidden_size=hidden,
                num_transformer_submodules=submodules, num_layers=2, num_attention_heads=2,
                encoder_reparameterization_type=kind)
    base.update(kw)
    return PeftConfig(**base)
