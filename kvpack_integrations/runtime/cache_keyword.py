"""The keyword under which a model's forward takes its KV cache.

transformers 5 renamed `past_key_values` to `cache` and will drop the old name (5.40). An unknown
keyword falls into the forward's `**kwargs` and is ignored without an error: the model would run
without the composed cache and exactness would break silently. So the name is read from the
forward's signature, once per model class, and a forward that takes neither is refused.
"""

from __future__ import annotations

import inspect
from functools import cache as memoize
from typing import Any

from ..errors import ModelLoadError

_KEYWORDS = ("cache", "past_key_values")  # the current name first


@memoize
def cache_keyword(model_class: Any) -> str:
    """`cache` or `past_key_values`, whichever `model_class.forward` declares."""
    params = inspect.signature(model_class.forward).parameters
    for name in _KEYWORDS:
        if name in params:
            return name
    raise ModelLoadError(
        f"{model_class.__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`): "
        "it cannot be used with cached segments"
    )


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand `cache` to `model`'s forward."""
    return {cache_keyword(model.__class__): cache}
