"""Adding steering deltas to a cache's values, in place, on the positions it holds; keys untouched."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..errors import CompositionError


def steer_values(cache: DynamicCache, deltas: torch.Tensor, upto: int) -> None:
    """values[l][:, :, :upto] += deltas[l] for every layer whose delta is non-zero.

    The cache must be a private copy (the engine composes one per request), never a stored segment.
    """
    if len(cache.layers) != deltas.shape[0]:
        raise CompositionError(f"the cache has {len(cache.layers)} layers, the steering deltas {deltas.shape[0]}")
    for index, layer in enumerate(cache.layers):
        delta = deltas[index]
        if not torch.any(delta):
            continue
        values = getattr(layer, "values", None)
        if values is None:
            raise CompositionError(f"cache layer {index} ({type(layer).__name__}) holds no values to steer")
        values[:, :, :upto] += delta.to(values.device, values.dtype)[None, :, None, :]
