"""Adding steering deltas to a cache's values, in place, on the positions it holds; keys untouched."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..errors import CompositionError, InvalidInputError

DEFAULT_LIMIT = 1.0  # a delta as large as the values it is added to: past this the model's reading collapses


def steer_values(cache: DynamicCache, deltas: torch.Tensor, upto: int, limit: float | None = DEFAULT_LIMIT) -> float:
    """values[l][:, :, :upto] += deltas[l] for every layer whose delta is non-zero; returns the largest ratio.

    The ratio of a layer is |delta| over the typical |value| there (root mean square over heads and
    positions). Above `limit` nothing is changed and the call fails: such an alpha drowns the values it
    steers (on the default model coherence is already gone at a ratio of ~0.6). The cache must be a
    private copy (the engine composes one per request), never a stored segment.
    """
    if len(cache.layers) != deltas.shape[0]:
        raise CompositionError(f"the cache has {len(cache.layers)} layers, the steering deltas {deltas.shape[0]}")
    steered: list[tuple[torch.Tensor, torch.Tensor]] = []
    worst, worst_layer = 0.0, -1
    for index, layer in enumerate(cache.layers):
        delta = deltas[index]
        if not torch.any(delta):
            continue
        values = getattr(layer, "values", None)
        if values is None:
            raise CompositionError(f"cache layer {index} ({type(layer).__name__}) holds no values to steer")
        delta = delta.to(values.device, values.dtype)
        typical = values[:, :, :upto].float().norm(dim=-1).pow(2).mean().sqrt()
        ratio = float(delta.float().norm(dim=-1).pow(2).mean().sqrt() / typical.clamp_min(1e-12))
        if ratio > worst:
            worst, worst_layer = ratio, index
        steered.append((values, delta))
    if limit is not None and worst > limit:
        raise InvalidInputError(
            f"steering too strong: at layer {worst_layer} the delta is {worst:.2f} times the typical value it is "
            f"added to (limit {limit:g}); lower alpha, or raise the engine's steering_limit to experiment"
        )
    for values, delta in steered:
        values[:, :, :upto] += delta[None, :, None, :]
    return worst
