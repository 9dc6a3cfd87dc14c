"""Accelerate an existing PEFT model in one line: ``ptuning_fast.accelerate(peft_model)``.

For every ``P_TUNING`` and ``PREFIX_TUNING`` adapter of a ``PeftModel``, in place:

- the encoder becomes this package's drop-in (``PromptEncoder`` / ``PrefixEncoder``) holding the
  very same ``Parameter`` objects, so trained weights, optimizers already built on them, DDP and
  hooks keep working;
- ``forward`` and ``generate`` run through the native path (:mod:`ptuning_fast.native`) with
  PEFT's semantics (``positions="peft"``: the v1 prompt in front of the input as given, positions
  counting every column, per-token outputs in PEFT's layout with the prompt columns first, deep
  prompts at ``P + i``): the same numbers as plain PEFT, on every transformers 5 release, with
  this package's kernels, prefix cache and fused mask;
- PEFT's keyword ``adapter_names=[...]`` (one adapter name per row) serves a mixed batch in
  ``forward`` and ``generate``: each row computes what it computes when its adapter runs alone;
  each adapter's ``modules_to_save`` copy (e.g. a classifier head, of any module type) serves its
  own rows. The rows of a call travel in a context variable, never on the shared modules, so
  concurrent calls from several threads or asyncio tasks give what they give one after another.

PEFT keeps its config, ``save_pretrained``, ``load_adapter``, ``set_adapter``, ``disable_adapter``
(inside it, ``forward`` and ``generate`` run the base model alone), ``print_trainable_parameters``
and the rest. ``get_prompt`` still answers (v1: the encoded
prompts broadcast over the batch; deep prompts: the prefix cache). Models whose prefix PEFT
post-processes (bloom, gemma 2-4) and adapters of other types keep PEFT's own forward.

``patch_peft()`` makes ``get_peft_model`` and ``PeftModel.from_pretrained`` build accelerated
models directly; ``unpatch_peft()`` undoes it; ``with peft_patched(): ...`` does both.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import types
import warnings

import torch
from peft import PeftModel, PeftType
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.constants import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING
from peft.utils.other import ModulesToSaveWrapper

from .native.adapters import encoded_prompt_table, resolve_rows
from .native.forward import prompt_forward
from .native.generate import prompt_generate
from .native.model import check_model_inputs
from .native.options import PromptOptions
from .ops.mask import preload_extension
from .p_tuning.encoder import PromptEncoder
from .prefix_tuning.encoder import PrefixEncoder, prefix_weights_of
from .prefix_tuning.functional import prefix_cache_for

_ATTRIBUTE = "_ptuning_fast"  # per-model state of the acceleration (the adapters view)
_PEFT_OPTIONS = PromptOptions(positions="peft")  # PEFT's forward semantics for every adapter


_FAST_ENCODERS = {PeftType.P_TUNING: PromptEncoder, PeftType.PREFIX_TUNING: PrefixEncoder}


def _rebuild_with_same_parameters(encoder, cls, config):
    """A ``cls`` encoder whose parameters ARE ``encoder``'s (same objects): built on the meta
    device (no allocation, no draw from the random generator), then given the old parameters."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # PEFT already warned about the same config when it built its encoder
        fast = cls(config)
    old = dict(encoder.named_parameters())
    new = dict(fast.named_parameters())
    if set(old) != set(new):
        raise RuntimeError(f"cannot swap {type(encoder).__name__} for {cls.__name__}: parameters differ "
                           f"({sorted(set(old) ^ set(new))})")
    for name, parameter in old.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = fast.get_submodule(owner_name) if owner_name else fast
        setattr(owner, leaf, parameter)
    for name, buffer in encoder.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        (fast.get_submodule(owner_name) if owner_name else fast).register_buffer(leaf, buffer)
    leftover = [n for n, t in list(fast.named_parameters()) + list(fast.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"cannot swap {type(encoder).__name__} for {cls.__name__}: {leftover} were not carried over")
    for module in fast.modules():
        if isinstance(module, torch.nn.RNNBase):
            module.flatten_parameters()  # the carried-over weights, laid out for cuDNN as PEFT's were
    fast.train(encoder.training)
    return fast


def _peft_handles_prefix_itself(peft_model, config=None) -> bool:
    """Models whose prefix PEFT post-processes (bloom, gemma...) keep PEFT's own prefix path."""
    model_type = getattr(peft_model.get_base_model().config, "model_type", "")
    return (model_type in TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING
            or any(name in model_type for name in ("gemma2", "gemma3", "gemma4")))


def _fast_get_prompt(self, batch_size: int, task_ids=None, max_cache_len=None):
    """``PeftModel.get_prompt``, routed through this package (same values, fewer copies)."""
    config = self.active_peft_config
    encoder = self.prompt_encoder[self.active_adapter]
    if config.peft_type == PeftType.P_TUNING:
        table = encoded_prompt_table(encoder, config)
        return table.unsqueeze(0).expand(batch_size, -1, -1)
    if config.peft_type == PeftType.PREFIX_TUNING and not _peft_handles_prefix_itself(self, config):
        text_length = max((max_cache_len or 0) - config.num_virtual_tokens, 0)  # PEFT's forward passes S + P
        return prefix_cache_for(self.get_base_model(), [prefix_weights_of(encoder)], None, batch_size,
                                seq_len=text_length, dtype=self.base_model_torch_dtype)
    return type(self).get_prompt(self, batch_size, task_ids=task_ids, max_cache_len=max_cache_len)


class _PeftOptions(dict):
    """Every adapter of the PeftModel runs with PEFT's semantics."""

    def __missing__(self, name):
        return _PEFT_OPTIONS


class PeftAdapters:
    """A ``PeftModel`` seen as a holder of prompt adapters (:mod:`ptuning_fast.native.adapters`):
    its live ``prompt_encoder``, ``peft_config`` and active adapter, PEFT's options for each."""

    prompt_options = _PeftOptions()

    def __init__(self, peft_model):
        self.peft_model = peft_model

    @property
    def base_model(self):
        return self.peft_model.get_base_model()

    @property
    def prompt_encoder(self):
        return self.peft_model.prompt_encoder

    @property
    def peft_config(self):
        return self.peft_model.peft_config

    @property
    def active_adapter(self):
        return self.peft_model.active_adapter

    def get_base_model(self):
        return self.base_model


def _routed_names(peft_model, adapter_names):
    """The adapters a call uses, or None when PEFT's own forward must run (see the module docstring)."""
    names = [peft_model.active_adapter] if adapter_names is None else list(dict.fromkeys(adapter_names))
    configs = peft_model.peft_config
    known = [n for n in names if isinstance(n, str) and n in configs]
    if len(known) != len(names):  # unknown names: the native path says which
        return names
    kinds = {configs[n].peft_type for n in names}
    if not kinds <= set(_FAST_ENCODERS) or (PeftType.PREFIX_TUNING in kinds
                                            and _peft_handles_prefix_itself(peft_model, None)):
        if adapter_names is not None:
            raise ValueError(f"`adapter_names` {names}: mixed batches run P_TUNING and PREFIX_TUNING adapters only, "
                             f"and not deep prompts on {peft_model.get_base_model().config.model_type} models (PEFT "
                             f"post-processes their prefix); these adapters are "
                             f"{ {n: configs[n].peft_type.value for n in names} }")
        return None
    return names


# The rows each adapter's ``modules_to_save`` copy serves in the routed call running in this
# thread / asyncio task (None: PEFT's own choice, the active adapter's copy).
_HEAD_ROWS: contextvars.ContextVar = contextvars.ContextVar("ptuning_fast_head_rows", default=None)
# The same under torch.compile, whose Dynamo traces neither ContextVar.set nor .get but traces a
# list's push and pop: traced together in one graph they leave the list as it was (empty), so the
# compiled call keeps its rows in the call. A call whose graph breaks between them (the model's
# own code can break it) pushes for real, for the call's duration, and the frames compiled after
# the break read it there (tests/compile/test_compile.py); eager code reads only its context
# variable, so that no other thread's call sees those rows.
_TRACED_HEAD_ROWS: list = []


def _head_rows():
    """The routed call's :class:`_HeadRows`, or None outside one."""
    if torch.compiler.is_compiling():
        return _TRACED_HEAD_ROWS[-1] if _TRACED_HEAD_ROWS else None
    return _HEAD_ROWS.get()


class _HeadRows:
    """A call's rows grouped by adapter: ``names`` (distinct), ``counts`` (rows of each, host ints
    counted from the caller's list), ``order`` (B,) the rows grouped by adapter and ``inverse`` its
    inverse permutation (None with one adapter), ``batch`` (B)."""

    __slots__ = ("names", "counts", "order", "inverse", "batch")

    def __init__(self, adapter_names, rows):
        self.names, self.batch = rows.names, len(adapter_names)
        counts = collections.Counter(adapter_names)
        self.counts = [counts[name] for name in rows.names]
        self.order = self.inverse = None
        if rows.index is not None:  # no host sync: a stable sort of the row index, and its inverse
            self.order = torch.argsort(rows.index, stable=True)
            positions = torch.arange(self.batch, device=rows.index.device)
            self.inverse = torch.empty_like(self.order).scatter_(0, self.order, positions)


def _adapter_copy(wrapper, name):
    """``name``'s copy of a ``modules_to_save`` module, or the original where ``name`` has none
    (as PEFT runs a wrapper whose active adapter has no copy)."""
    return wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module


def _modules_to_save_forward(self, x, *args, **kwargs):
    """A ``ModulesToSaveWrapper``'s forward: inside a routed call with ``adapter_names``, each
    adapter's own copy runs on that adapter's rows, whatever the module's type; else PEFT's."""
    rows = _head_rows()
    if rows is None or self.disable_adapters or "adapter_names" in kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] % rows.batch:
        raise ValueError(f"`adapter_names` gives {rows.batch} rows, but the modules_to_save module got an input of "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}: its first "
                         "dimension must be the batch")
    if rows.order is None:
        return _adapter_copy(self, rows.names[0])(x, *args, **kwargs)
    repeats = x.shape[0] // rows.batch  # generate() repeats each row for beams / returned sequences
    order, inverse, counts = rows.order, rows.inverse, rows.counts
    if repeats != 1:
        step = torch.arange(repeats, device=order.device)
        order, inverse = ((order[:, None] * repeats + step).flatten(), (inverse[:, None] * repeats + step).flatten())
        counts = [c * repeats for c in counts]
    pieces = x.index_select(0, order).split(counts)
    outputs = [_adapter_copy(self, name)(piece, *args, **kwargs) for name, piece in zip(rows.names, pieces)]
    return torch.cat(outputs).index_select(0, inverse)


def _route_modules_to_save(model) -> bool:
    """Give every ``modules_to_save`` wrapper of ``model`` the forward above (once per wrapper;
    wrappers PEFT adds later get it at the next routed call); whether ``model`` has any."""
    found = False
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            found = True
            if "forward" not in module.__dict__:
                module.forward = types.MethodType(_modules_to_save_forward, module)
    return found


@contextlib.contextmanager
def _head_rows_of_call(model, adapter_names, rows):
    """The call's rows for the ``modules_to_save`` copies, in a context variable for the call.
    Without ``adapter_names``, or on a model without such copies (a causal LM's usual case),
    nothing is set (nothing would read it); under torch.compile the rows go on the traced stack."""
    if adapter_names is None or not _route_modules_to_save(model):
        yield
        return
    if torch.compiler.is_compiling():
        _TRACED_HEAD_ROWS.append(_HeadRows(adapter_names, rows))
        try:
            yield
        finally:
            _TRACED_HEAD_ROWS.pop()
        return
    token = _HEAD_ROWS.set(_HeadRows(adapter_names, rows))
    try:
        yield
    finally:
        _HEAD_ROWS.reset(token)


def _routed_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, *,
                    adapter_names=None, task_ids=None, **kwargs):
    """``PeftModel.forward`` through the native path, PEFT's semantics kept; ``adapter_names``:
    one adapter name per row (PEFT's keyword)."""
    names = None if task_ids is not None else _routed_names(self, adapter_names)
    if names is None:
        if task_ids is not None:
            kwargs["task_ids"] = task_ids
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  inputs_embeds=inputs_embeds, labels=labels, **kwargs)
    holder = self.__dict__[_ATTRIBUTE]
    # a new dict: the frame's own ``kwargs`` stays as called (torch.compile replays writes into it)
    kwargs = {key: value for key, value in kwargs.items()
              if value is not None or key not in ("output_attentions", "output_hidden_states", "return_dict")}
    if labels is not None:
        kwargs["labels"] = labels
    per_token = {k: kwargs.get(k) for k in ("position_ids", "token_type_ids", "labels")}
    text = check_model_inputs(holder, input_ids, attention_mask, inputs_embeds, per_token)
    rows = resolve_rows(holder, adapter_names, text.shape[0], text.device)
    return_dict = kwargs.pop("return_dict", None)
    with _head_rows_of_call(holder.base_model, adapter_names, rows):
        out = prompt_forward(holder, rows, input_ids, attention_mask, inputs_embeds, kwargs)
    return out if return_dict is not False else out.to_tuple()


def _routed_generate(self, *args, adapter_names=None, **kwargs):
    """``PeftModel.generate`` through the native path; ``adapter_names``: one name per row."""
    if getattr(self, "_adapters_disabled", False):  # inside `with model.disable_adapter():` the base model's tokens
        if adapter_names is not None:
            raise ValueError("`adapter_names` picks prompt adapters, but they are disabled inside "
                             "`model.disable_adapter()`")
        return self.get_base_model().generate(*args, **kwargs)
    names = None if kwargs.get("task_ids") is not None else _routed_names(self, adapter_names)
    if names is None:
        return type(self).generate(self, *args, **kwargs)
    if args:  # generate(input_ids, ...) as transformers allows
        if "input_ids" in kwargs or len(args) > 1:
            raise TypeError("generate() takes `input_ids` as its only positional argument")
        kwargs["input_ids"] = args[0]
    holder = self.__dict__[_ATTRIBUTE]
    input_ids, attention_mask = kwargs.pop("input_ids", None), kwargs.pop("attention_mask", None)
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    text = check_model_inputs(holder, input_ids, attention_mask, inputs_embeds, {})
    rows = resolve_rows(holder, adapter_names, text.shape[0], text.device)
    with _head_rows_of_call(holder.base_model, adapter_names, rows):
        return prompt_generate(holder, rows, input_ids, attention_mask, inputs_embeds, kwargs)


def accelerate(peft_model):
    """Route an existing ``PeftModel``'s P-tuning / prefix-tuning steps through ptuning_fast, in place.

    Keeps the trained weights (the same ``Parameter`` objects) and gives the same results; returns
    ``peft_model``. Adapters of other PEFT types are left alone. Calling it again is harmless.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"`peft_model` must be a peft.PeftModel, got {type(peft_model).__name__}")
    if not getattr(peft_model, "_is_prompt_learning", False):
        raise ValueError("`peft_model` holds no prompt-learning adapter (P_TUNING / PREFIX_TUNING): "
                         f"its PEFT type is {peft_model.active_peft_config.peft_type.value}")
    for name, encoder in list(peft_model.prompt_encoder.items()):
        config = peft_model.peft_config[name]
        cls = _FAST_ENCODERS.get(config.peft_type)
        if cls is not None and not isinstance(encoder, cls):
            peft_model.prompt_encoder[name] = _rebuild_with_same_parameters(encoder, cls, config)
    _route_modules_to_save(peft_model)
    preload_extension()
    if _ATTRIBUTE not in peft_model.__dict__:
        peft_model.__dict__[_ATTRIBUTE] = PeftAdapters(peft_model)
        peft_model.get_prompt = types.MethodType(_fast_get_prompt, peft_model)
        peft_model.forward = types.MethodType(_routed_forward, peft_model)
        peft_model.generate = types.MethodType(_routed_generate, peft_model)
    return peft_model


def is_accelerated(peft_model) -> bool:
    """Whether :func:`accelerate` has been applied to ``peft_model``."""
    return isinstance(peft_model, PeftModel) and _ATTRIBUTE in peft_model.__dict__


# ---------------------------------------------------------------------------------------------
# Make PEFT build accelerated models directly
# ---------------------------------------------------------------------------------------------
_saved = {}


def patch_peft() -> None:
    """From now on ``get_peft_model`` / ``PeftModel.from_pretrained`` (and ``add_adapter``) build
    this package's encoders and accelerated models. Undo with :func:`unpatch_peft`."""
    if _saved:
        return
    _saved["tuners"] = {t: PEFT_TYPE_TO_TUNER_MAPPING[t] for t in (PeftType.P_TUNING, PeftType.PREFIX_TUNING)}
    _saved["setup"] = PeftModel.__dict__["_setup_prompt_encoder"]
    PEFT_TYPE_TO_TUNER_MAPPING.update(_FAST_ENCODERS)
    original_setup = _saved["setup"]

    def _setup_prompt_encoder(self, adapter_name: str):
        original_setup(self, adapter_name)
        accelerate(self)

    PeftModel._setup_prompt_encoder = _setup_prompt_encoder


def unpatch_peft() -> None:
    """Undo :func:`patch_peft` (models built meanwhile stay accelerated)."""
    if not _saved:
        return
    PEFT_TYPE_TO_TUNER_MAPPING.update(_saved["tuners"])
    PeftModel._setup_prompt_encoder = _saved["setup"]
    _saved.clear()


def is_peft_patched() -> bool:
    return bool(_saved)


@contextlib.contextmanager
def peft_patched():
    """``with peft_patched(): model = get_peft_model(...)``: PEFT builds accelerated models inside."""
    was_patched = is_peft_patched()
    patch_peft()
    try:
        yield
    finally:
        if not was_patched:
            unpatch_peft()


__all__ = ["accelerate", "is_accelerated", "is_peft_patched", "patch_peft", "peft_patched", "unpatch_peft"]
