"""Keyword names of transformers' functions that changed between releases, read from their signatures.

transformers 5.24 renamed the cache keyword of decoder layers, attention modules,
``create_causal_mask`` and ``generate()`` from ``past_key_values`` to ``cache``
(the old name still works through a deprecation shim until 5.40). A cache passed
under a name the callee does not take would fall into its ``**kwargs`` and be
ignored: the layer would run without its KV cache and compute a wrong answer that
looks right. So callers ask the signature which name it takes, and anything that
takes neither is refused at load time.
"""

from __future__ import annotations

import inspect
from typing import Callable

import transformers

__all__ = ["CACHE_KEYWORDS", "UnsupportedTransformersError", "cache_keyword_of"]

# Every name transformers has used for a cache argument, newest first.
CACHE_KEYWORDS = ("cache", "past_key_values")


class UnsupportedTransformersError(RuntimeError):
    """transformers did something BioPetals was not written for; computing on would risk a wrong answer."""


def cache_keyword_of(fn: Callable) -> str:
    """The name under which ``fn`` takes its cache (``inspect.signature`` sees through ``functools.wraps``)."""
    params = inspect.signature(fn).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise UnsupportedTransformersError(
        f"transformers {transformers.__version__}: {getattr(fn, '__qualname__', fn)} takes its cache under none of "
        f"{CACHE_KEYWORDS}; this BioPetals release does not support it (install the versions of constraints.txt)"
    )
