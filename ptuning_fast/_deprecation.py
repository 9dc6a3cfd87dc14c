"""Old argument names that still work, with a DeprecationWarning naming the new one."""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional, Tuple, Union

# old keyword -> new keyword, or (new keyword, function converting the old value)
Renames = dict[str, Union[str, Tuple[str, Callable]]]


def warn_deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"`{old}` is deprecated; use `{new}` instead", DeprecationWarning, stacklevel=stacklevel)


def renamed_keywords(**renames) -> Callable:
    """Decorator: calls that pass an old keyword get it under its new name (converted where a
    function is given), with a DeprecationWarning; passing both names is a TypeError."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if kwargs:
                for old, target in renames.items():
                    if old in kwargs:
                        new, convert = (target, None) if isinstance(target, str) else target
                        if new in kwargs:
                            raise TypeError(f"{fn.__name__}() got both `{old}` (deprecated) and `{new}`")
                        warn_deprecated(old, new)
                        value = kwargs.pop(old)
                        kwargs[new] = convert(value) if convert is not None else value
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def deprecated_alias(new_fn: Callable, old_name: str, new_name: Optional[str] = None) -> Callable:
    """A function named ``old_name`` that warns and calls ``new_fn``."""

    @functools.wraps(new_fn)
    def alias(*args, **kwargs):
        warn_deprecated(old_name, new_name or new_fn.__name__)
        return new_fn(*args, **kwargs)

    alias.__name__ = old_name
    return alias


__all__ = ["deprecated_alias", "renamed_keywords", "warn_deprecated"]
