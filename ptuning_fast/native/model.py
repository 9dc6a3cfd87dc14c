"""Native P-tuning for transformers models, without a PEFT wrapper: ``get_ptuning_model(model, config)``.

``config`` is a PEFT config (ours or PEFT's): ``PromptEncoderConfig`` (P-tuning v1, ``P_TUNING``:
virtual tokens in the input) or ``PrefixTuningConfig`` (P-Tuning v2 deep prompts,
``PREFIX_TUNING``: a key/value prefix in every layer). Checkpoints use PEFT's adapter format
(:mod:`ptuning_fast.native.checkpoint`).

- **Templates** (v1): with ``PromptOptions(placement="template", prompt_token_id=...)`` the
  virtual tokens go wherever ``input_ids`` hold the placeholder id, e.g. ``[P][P] x [P] ? [MASK]``
  (:class:`~ptuning_fast.native.template.PromptTemplate` builds such inputs). The k-th
  placeholder of a row gets virtual token k.
- **Every head**: causal LM, sequence and token classification, question answering (the span
  loss is taken over the caller's columns, never over prompt columns), seq2seq, masked LM and
  feature extraction, for both prompt kinds, under gradient checkpointing too.
- **Padding and positions**: see :mod:`ptuning_fast.native.layout`; per-token outputs come back
  aligned with the caller's ``input_ids`` columns.
- **Several adapters** live in ``prompt_encoder`` (an ``nn.ModuleDict`` keyed by adapter name,
  as PEFT's); ``adapter_names=[...]`` (one name per row) mixes them in one batch, in ``forward``
  and ``generate()`` (:mod:`ptuning_fast.native.adapters` says which mixes cannot share a batch).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
from peft import PeftModel, PeftType
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._validation import INDEX_DTYPES, check_tensor, check_token_tensor
from ..hf.compat import get_cache
from ..hf.heads import check_per_token_inputs
from ..hf.introspection import check_supports_cache
from ..ops.mask import preload_extension
from .adapters import (check_adapter_identifier, check_adapter_name, check_not_other_peft_types, make_encoder,
                       prepare_config, resolve_rows, task_of)
from .checkpoint import freeze_adapter, load_adapter_into, read_adapter_folder, save_adapter
from .forward import prompt_forward
from .generate import prompt_generate
from .options import PromptOptions

_PER_TOKEN_HINT = ": one entry per input token"


def check_model_inputs(holder, input_ids, attention_mask, inputs_embeds, per_token: dict) -> torch.Tensor:
    """The text (``input_ids`` or ``inputs_embeds``) and its per-token tensors, checked; returns the text."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
    device = holder.base_model.get_input_embeddings().weight.device
    if input_ids is not None:
        text = check_tensor(input_ids, "input_ids", ndim=2, dtypes=INDEX_DTYPES, device=device)
    else:
        text = check_tensor(inputs_embeds, "inputs_embeds", ndim=3, device=device)
    if attention_mask is not None:
        check_token_tensor(attention_mask, "attention_mask", text.shape[:2], of="the input", device=device)
    check_per_token_inputs(task_of(holder), text.shape[:2], device, per_token, of="the input", hint=_PER_TOKEN_HINT)
    return text


class PTuningModel(torch.nn.Module):
    """A transformers model with P-tuning prompt adapters (v1 prompts or v2 deep prompts).

    Build with :func:`get_ptuning_model`. The base model's weights are frozen; only the prompt
    encoders train. ``forward`` takes the base model's arguments plus ``adapter_names`` (one name
    per row, optional); ``generate`` likewise. Attributes not found here are read from the base model.
    """

    def __init__(self, model, config, adapter_name: str = "default", options: Optional[PromptOptions] = None):
        super().__init__()
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"`model` must be a transformers model, got {type(model).__name__}")
        self.base_model = model
        self.prompt_encoder = torch.nn.ModuleDict()
        self.peft_config: Dict[str, object] = {}
        self.prompt_options: Dict[str, PromptOptions] = {}
        self.active_adapter = adapter_name
        self._frozen: Dict[str, tuple] = {}  # adapter -> (its trainable encoder, its config), see freeze_prompts
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.add_adapter(adapter_name, config, options)
        preload_extension()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---------------------------------------------------------------------------------- adapters
    def add_adapter(self, adapter_name: str, config, options: Optional[PromptOptions] = None) -> None:
        """Add a prompt adapter built from ``config`` (not made active: see :meth:`set_adapter`)."""
        check_adapter_identifier(adapter_name)
        if adapter_name in self.prompt_encoder:
            raise ValueError(f"an adapter named {adapter_name!r} already exists")
        options = PromptOptions() if options is None else options
        if not isinstance(options, PromptOptions):
            raise TypeError(f"`options` must be a PromptOptions, got {type(options).__name__}")
        known = next(iter(self.peft_config.values()), None)
        config = prepare_config(config, self.base_model, known.task_type if known is not None else None)
        if config.peft_type == PeftType.PREFIX_TUNING and options.placement != "prefix":
            raise ValueError("deep prompts (PREFIX_TUNING) live in the attention cache: `placement` must be 'prefix'")
        if config.peft_type == PeftType.PREFIX_TUNING:
            check_supports_cache(self.base_model)
        if options.placement == "template" and config.num_transformer_submodules != 1:
            raise ValueError("template placement puts the virtual tokens in the encoder input: it needs "
                             "`num_transformer_submodules=1`")
        encoder = make_encoder(config)
        embeddings = self.base_model.get_input_embeddings().weight
        self.prompt_encoder[adapter_name] = encoder.to(embeddings.device)
        self.peft_config[adapter_name] = config
        self.prompt_options[adapter_name] = options

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter of rows that name none."""
        check_adapter_name(self, adapter_name, "adapter_name")
        self.active_adapter = adapter_name

    @property
    def active_adapters(self) -> List[str]:
        return [self.active_adapter]

    @property
    def active_peft_config(self):
        return self.peft_config[self.active_adapter]

    def get_base_model(self):
        return self.base_model

    def get_nb_trainable_parameters(self):
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------------------ frozen serving
    def freeze_prompts(self, adapter_names: Optional[Sequence[str]] = None) -> None:
        """For serving: encode each adapter's prompts once and keep only the result.

        Each adapter's encoder is replaced by its inference form, PEFT's: an embedding whose
        weight is the encoded prompts (v1: ``(T_total, D)``; deep prompts: ``(T, L * 2 * D)``),
        with ``requires_grad=False``, as ``PeftModel.from_pretrained`` loads an adapter. What it
        promises: forward, ``generate()`` and saved adapters use those encoded prompts, computed
        from the encoder weights at the time of this call; later changes to the trainable encoder
        (it is kept aside, untouched) have no effect until :meth:`unfreeze_prompts`. Nothing else
        is cached: the frozen prompts are the adapter's only parameters.
        """
        names = list(self.prompt_encoder) if adapter_names is None else list(adapter_names)
        for name in names:
            check_adapter_name(self, name, "adapter_names")
        for name in names:
            if name in self._frozen or self.peft_config[name].inference_mode:
                continue
            frozen, config = freeze_adapter(self.prompt_encoder[name], self.peft_config[name])
            self._frozen[name] = (self.prompt_encoder[name], self.peft_config[name])
            self.prompt_encoder[name], self.peft_config[name] = frozen, config

    def unfreeze_prompts(self, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Undo :meth:`freeze_prompts`: the trainable encoders come back as they were."""
        names = list(self._frozen) if adapter_names is None else list(adapter_names)
        for name in names:
            check_adapter_name(self, name, "adapter_names")
            if name in self._frozen:
                encoder, config = self._frozen.pop(name)
                self.prompt_encoder[name], self.peft_config[name] = encoder, config

    def _check_something_trains(self, inputs_embeds) -> None:
        """A training forward (grad mode, model in training mode) where nothing requires grad would
        fail only at ``backward()``, with torch's "element 0 of tensors does not require grad": name
        the cause here. Host-side flags only (no sync); in a normal step the first prompt parameter
        ends the search. Training a head (or anything else) beside frozen prompts is left alone."""
        if any(p.requires_grad for p in self.prompt_encoder.parameters()):
            return
        if any(p.requires_grad for p in self.parameters()) or (inputs_embeds is not None and inputs_embeds.requires_grad):
            return
        frozen = sorted(self._frozen)
        cause = (f"the prompts of {frozen} are frozen by freeze_prompts(): call model.unfreeze_prompts() to train them"
                 if frozen else "the adapters were loaded for inference: load them with "
                 "load_adapter(..., is_trainable=True) to train them")
        raise RuntimeError(f"training forward with no trainable parameter: {cause}, or give some other parameter "
                           "requires_grad=True. For a forward that does not train, use torch.no_grad() or "
                           "model.eval().")

    # ---------------------------------------------------------------------------------- forward
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, token_type_ids=None,
                position_ids=None, start_positions=None, end_positions=None, decoder_input_ids=None,
                decoder_attention_mask=None, *, adapter_names=None, **kwargs):
        """The base model's forward with the prompts of ``adapter_names`` (one adapter name per row;
        default: the active adapter). Arguments as the base model's; ``position_ids`` are the text's
        own positions (counted without the prompt). Per-token outputs are aligned with ``input_ids``."""
        named = dict(labels=labels, token_type_ids=token_type_ids, position_ids=position_ids,
                     start_positions=start_positions, end_positions=end_positions,
                     decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask)
        # a new dict: the frame's own ``kwargs`` stays as called (torch.compile replays writes into it)
        kwargs = {**kwargs, **{key: value for key, value in named.items() if value is not None}}
        if get_cache(kwargs) is not None:
            raise ValueError("`past_key_values` / `cache`: pass the whole sequence (the prompt is added to it here); "
                             "use generate() for incremental decoding")
        text = check_model_inputs(self, input_ids, attention_mask, inputs_embeds,
                                  {"position_ids": position_ids, "token_type_ids": token_type_ids, "labels": labels})
        if torch.is_grad_enabled() and self.base_model.training:
            self._check_something_trains(inputs_embeds)
        rows = resolve_rows(self, adapter_names, text.shape[0], text.device)
        return_dict = kwargs.pop("return_dict", None)
        out = prompt_forward(self, rows, input_ids, attention_mask, inputs_embeds, kwargs)
        return out if return_dict is not False else out.to_tuple()

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, inputs_embeds=None, *, adapter_names=None, **kwargs):
        """``base_model.generate`` with the prompts (encoded once per call, from the current weights).
        Decoder-only models return ``input_ids`` followed by the new tokens, as transformers does;
        seq2seq models return the decoder tokens."""
        text = check_model_inputs(self, input_ids, attention_mask, inputs_embeds, {})
        rows = resolve_rows(self, adapter_names, text.shape[0], text.device)
        return prompt_generate(self, rows, input_ids, attention_mask, inputs_embeds, kwargs)

    # ------------------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory: str, selected_adapters: Optional[Sequence[str]] = None,
                        save_encoder: bool = False, optimizer=None) -> None:
        """Save adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``;
        non-default adapters in sub-folders). ``save_encoder=True`` also saves the full encoder
        (and ``optimizer``'s state) so that training can resume. Safetensors only."""
        names = list(self.prompt_encoder) if selected_adapters is None else list(selected_adapters)
        for name in names:
            check_adapter_name(self, name, "selected_adapters")
            save_adapter(self, save_directory, adapter_name=name, save_encoder=save_encoder,
                         optimizer=optimizer if name == names[0] else None)

    def load_adapter(self, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                     optimizer=None) -> None:
        """Add the adapter saved in ``model_id`` (ours or PEFT's) as ``adapter_name``."""
        load_adapter_into(self, model_id, adapter_name=adapter_name, is_trainable=is_trainable, optimizer=optimizer)

    @classmethod
    def from_pretrained(cls, model, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                        optimizer=None) -> "PTuningModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (ours or PEFT's)."""
        return load_adapter(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                            optimizer=optimizer)


class AdapterCheckpointCallback(TrainerCallback):
    """For the HF ``Trainer`` training a :class:`PTuningModel`: every checkpoint folder the Trainer
    saves (``checkpoint-STEP``) also holds the model's adapters in PEFT's format, which
    ``PeftModel.from_pretrained`` and :func:`load_adapter` read::

        Trainer(model=ptuning_model, args=args, train_dataset=data, callbacks=[AdapterCheckpointCallback()])

    The Trainer calls ``save_pretrained`` only on a ``PreTrainedModel`` or ``PeftModel``; of any
    other module it writes the whole ``state_dict`` (base model included) as ``model.safetensors``,
    which it keeps for its own ``resume_from_checkpoint``. ``save_encoder=True`` also writes the
    encoders, so that ``load_adapter(..., is_trainable=True)`` resumes them. A ``PeftModel``
    needs no callback: the Trainer saves its adapter folder itself.
    """

    def __init__(self, save_encoder: bool = False):
        if not isinstance(save_encoder, bool):
            raise TypeError(f"`save_encoder` must be a bool, got {save_encoder!r}")
        self.save_encoder = save_encoder

    def on_save(self, args, state, control, model=None, **kwargs):
        if isinstance(model, PeftModel):
            return
        if not isinstance(model, PTuningModel):
            raise TypeError(f"AdapterCheckpointCallback saves the adapters of a PTuningModel; the Trainer's model is "
                            f"{type(model).__name__}")
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            model.save_pretrained(folder, save_encoder=self.save_encoder)


def get_ptuning_model(model, config, adapter_name: str = "default", options: Optional[PromptOptions] = None,
                      **option_kwargs) -> PTuningModel:
    """Wrap a transformers ``model`` with a P-tuning adapter built from ``config``.

    ``config``: ``PromptEncoderConfig`` (v1) or ``PrefixTuningConfig`` (v2 deep prompts), ours or
    PEFT's; ``task_type`` may be left out (read from the model class). ``options`` (or its fields
    as keywords: ``placement``, ``prompt_token_id``, ``positions``): see :class:`PromptOptions`.
    """
    if options is not None and option_kwargs:
        raise ValueError("pass either `options` or its fields as keywords, not both")
    if options is None:
        options = PromptOptions.from_dict(option_kwargs)
    return PTuningModel(model, config, adapter_name=adapter_name, options=options)


def load_adapter(model, model_id: str, adapter_name: str = "default", *, is_trainable: bool = False,
                 optimizer: Optional[torch.optim.Optimizer] = None):
    """Load the adapter folder ``model_id`` (ours or PEFT's) as ``adapter_name``.

    ``model``: a transformers model (a new :class:`PTuningModel` is returned), or a
    ``PTuningModel`` / ``PeftModel``: the adapter is added, or, when it exists, its weights are
    copied into its parameters in place (so an optimizer already built on them stays valid).
    ``is_trainable=True`` loads the whole encoder (written with ``save_encoder=True``) and, with
    ``optimizer``, restores its state, so that training resumes where it stopped::

        model = get_ptuning_model(base, config)                    # or get_peft_model(...)
        optimizer = torch.optim.AdamW(model.prompt_encoder.parameters())
        load_adapter(model, "ckpt", is_trainable=True, optimizer=optimizer)

    Otherwise the encoded prompts are loaded for inference, as PEFT does. Returns the model
    holding the adapter.
    """
    check_not_other_peft_types(model)
    if hasattr(model, "prompt_encoder") and hasattr(model, "peft_config"):
        return load_adapter_into(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                                 optimizer=optimizer)
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config")):
        raise TypeError(f"`model` must be a transformers model, a PTuningModel or a peft.PeftModel, got "
                        f"{type(model).__name__}")
    config, options, _ = read_adapter_folder(model_id, is_trainable=is_trainable, adapter_name=adapter_name)
    holder = PTuningModel(model, config, adapter_name=adapter_name, options=options)
    return load_adapter_into(holder, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                             optimizer=optimizer)


__all__ = ["AdapterCheckpointCallback", "PTuningModel", "check_model_inputs", "get_ptuning_model", "load_adapter"]
