"""Selective recompute over a composed cache: the CacheBlend- and EPIC-style baselines.

`recompute_positions` recomputes the K/V of chosen positions of a composed cache in one forward pass:
the chosen tokens enter as new queries at their own positions, each attending to the composed cache
before it (old K/V, except for the chosen positions, whose fresh K/V it sees instead) and to itself;
the fresh K/V are then written back in place. `value_deviation` is CacheBlend's selection signal: how
far each position's layer-1 values in the composed cache are from the values a full forward computes
(only the first two layers run).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from ..composition.cache_ops import empty_cache
from ..errors import CompositionError
from ..runtime.cache_keyword import with_cache
from ..runtime.loader import LoadedModel


def recompute_positions(loaded: LoadedModel, cache: DynamicCache, ids: Sequence[int], positions: Sequence[int]) -> None:
    """Recompute the cache entries at `positions` (indices into `ids`, the cached tokens) in place."""
    chosen = sorted(set(int(p) for p in positions))
    if not chosen:
        return
    length = cache.get_seq_length()
    if len(ids) != length or chosen[0] < 0 or chosen[-1] >= length:
        raise CompositionError(f"positions {chosen[0]}..{chosen[-1]} are outside the {length} cached tokens")
    pos = torch.tensor(chosen, device=loaded.device)
    q = len(chosen)
    allowed = torch.zeros(q, length + q, dtype=torch.bool, device=loaded.device)
    allowed[:, :length] = torch.arange(length, device=loaded.device)[None, :] < pos[:, None]
    allowed[:, pos] = False  # a chosen position is seen through its fresh K/V, not its old one
    allowed[:, length:] = torch.tril(torch.ones(q, q, dtype=torch.bool, device=loaded.device))
    mask = torch.zeros(q, length + q, dtype=loaded.dtype, device=loaded.device)
    mask.masked_fill_(~allowed, torch.finfo(loaded.dtype).min)
    input_ids = torch.tensor([[ids[p] for p in chosen]], dtype=torch.long, device=loaded.device)
    with torch.no_grad():
        loaded.model(
            input_ids=input_ids,
            **with_cache(loaded.model, cache),
            attention_mask=mask[None, None],
            position_ids=pos[None],
            use_cache=True,
        )
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.shape[-2] != length + q:
            raise CompositionError(f"{type(layer).__name__} cache layers cannot be recomputed in place")
        keys[:, :, pos] = keys[:, :, length:]
        values[:, :, pos] = values[:, :, length:]
    cache.crop(-q)  # transformers 5: a negative count removes that many positions


class _Stop(Exception):
    pass


def layer_values(loaded: LoadedModel, ids: Sequence[int], layer: int = 1) -> torch.Tensor:
    """Values [kv_heads, len, head_dim] of `layer` under a full forward, running only layers 0..layer.

    Read from the forward's own cache once that decoder layer has run, not from a projection module:
    models with a fused QKV projection (Phi-3's `qkv_proj`) have no `v_proj`, and the cache holds the
    values exactly as composed caches do (after any value norm), so the deviation compares like with like."""
    decoder = getattr(loaded.model, "model", loaded.model)
    layers = getattr(decoder, "layers", None)
    if layers is None or not 0 <= layer < len(layers):
        raise CompositionError(f"{loaded.name}: no decoder layer {layer} to read values from")
    owner = threading.get_ident()
    reached: list[bool] = []

    def stop(module: torch.nn.Module, args: tuple, output: object) -> None:
        # the model is shared: another thread's forward (a request decoding) passes through untouched
        if threading.get_ident() != owner:
            return
        reached.append(True)
        raise _Stop

    cache = empty_cache(loaded)
    handle = layers[layer].register_forward_hook(stop)
    try:
        with torch.no_grad():
            loaded.model(
                input_ids=torch.tensor([list(ids)], device=loaded.device),
                **with_cache(loaded.model, cache),
                use_cache=True,
            )
    except _Stop:
        pass
    finally:
        handle.remove()
    values = getattr(cache.layers[layer], "values", None) if reached and len(cache.layers) > layer else None
    if values is None or values.shape[-2] != len(ids):
        raise CompositionError(f"{loaded.name}: the values of layer {layer} for {len(ids)} tokens were not cached")
    return values[0]


def value_deviation(loaded: LoadedModel, cache: DynamicCache, ids: Sequence[int], layer: int = 1) -> torch.Tensor:
    """Per position: |V_cache - V_full| at `layer` (CacheBlend's signal for what to recompute)."""
    full = layer_values(loaded, ids, layer)
    cached = getattr(cache.layers[layer], "values", None)
    if cached is None:
        raise CompositionError(f"cache layer {layer} holds no values")
    return (cached[0, :, : len(ids)].float() - full.float()).norm(dim=-1).mean(dim=0)
