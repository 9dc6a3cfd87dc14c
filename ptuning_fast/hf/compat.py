"""What differs between the transformers 5 releases this package supports.

transformers 5.24 renamed the cache argument of ``forward`` / ``generate`` /
``prepare_inputs_for_generation`` from ``past_key_values`` to ``cache`` (the old name is still
accepted, with a deprecation warning, and rewritten to the new one). We pass, and read back,
whichever name the installed version uses, so neither side sees a deprecated keyword.
"""
import inspect

from transformers import GenerationMixin

CACHE_KWARG = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
               else "past_key_values")
"""The keyword a model's ``forward`` takes its KV cache under: ``cache`` (>= 5.24) or ``past_key_values``."""


def get_cache(kwargs: dict):
    """The cache in a model's keyword arguments, under either name (None if absent)."""
    cache = kwargs.get(CACHE_KWARG)
    return kwargs.get("past_key_values") if cache is None else cache
