"""Moving K/V between segments and transformers' `DynamicCache` (v5: `cache.layers[i].keys/values`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..errors import CompositionError, ContextTooLongError, KVPackError
from ..runtime.cache_keyword import with_cache
from ..runtime.loader import LoadedModel
from ..segments.segment import KVSegment, SegmentKind, context_hash
from .radix_tree import SegmentSlice


def empty_cache(loaded: LoadedModel) -> DynamicCache:
    """A cache with the model's own layer types (sliding-window layers included)."""
    return DynamicCache(config=loaded.model.config)


def cache_from_pieces(loaded: LoadedModel, pieces: Sequence[SegmentSlice]) -> DynamicCache:
    """A fresh cache holding the concatenated slices; always a copy, so stored segments stay immutable."""
    cache = empty_cache(loaded)
    if not pieces:
        return cache
    dtype, device = loaded.dtype, loaded.device
    for layer in range(loaded.fingerprint.num_layers):
        keys = torch.cat([p.segment.keys[layer][:, p.lo : p.hi].to(device, dtype) for p in pieces], dim=1)
        values = torch.cat([p.segment.values[layer][:, p.lo : p.hi].to(device, dtype) for p in pieces], dim=1)
        cache.update(keys.unsqueeze(0), values.unsqueeze(0), layer)
    return cache


def check_context_window(loaded: LoadedModel, prompt_tokens: int, new_tokens: int = 0) -> None:
    """Refuse prompts (plus tokens to generate) that do not fit the model's positions."""
    window = loaded.context_window
    if prompt_tokens + new_tokens > window:
        asked = f" and {new_tokens} new tokens were asked for" if new_tokens else ""
        raise ContextTooLongError(
            f"the prompt has {prompt_tokens} tokens{asked}, which exceeds {loaded.name}'s context window of "
            f"{window} tokens; use fewer or shorter facts, or fewer new tokens"
        )


def check_sliding_window(
    loaded: LoadedModel,
    positions: int,
    what: str = "this knowledge prefix",
    remedy: str = "keep knowledge shorter or use text mode",
    error: type[KVPackError] = CompositionError,
) -> None:
    """Sliding-window layers keep only their last `window - 1` positions: a cache reaching the window
    would lose its first positions and shift everything after them, silently. Refused with `error`,
    naming `what` reached it and the `remedy`."""
    window = loaded.sliding_window
    if window is not None and positions >= window:
        raise error(
            f"{loaded.name} has sliding-window attention layers (window {window}: each keeps its last "
            f"{window - 1} positions), and {what} spans {positions} positions: {remedy}"
        )


def check_rope_regime(
    loaded: LoadedModel,
    positions: int,
    what: str = "this knowledge prefix",
    remedy: str = "keep knowledge shorter or use text mode",
    error: type[KVPackError] = CompositionError,
) -> None:
    """LongRoPE rotates every key of a forward reaching past `original_max_position_embeddings` with
    other factors: a cache computed so would not equal any shorter prompt's. Refused, naming `what`."""
    limit = loaded.rope_regime_limit
    if limit is not None and positions > limit:
        raise error(
            f"{loaded.name} uses LongRoPE, whose factors change for forward passes past {limit} positions, and "
            f"{what} spans {positions}: its cache would not equal a shorter prompt's; {remedy}"
        )


def segments_from_cache(
    loaded: LoadedModel, cache: DynamicCache, ids: Sequence[int], boundaries: Sequence[int], start: int = 0
) -> list[KVSegment]:
    """Cut the cache of `ids` at `boundaries` (token counts, increasing) into segments, from `start` on."""
    out: list[KVSegment] = []
    prev = start
    for end in boundaries:
        if end <= prev:
            continue
        keys, values = [], []
        for layer in cache.layers:
            if not isinstance(layer, DynamicLayer):
                raise CompositionError(f"cache layers of type {type(layer).__name__} cannot be cut into segments")
            if layer.keys is None or layer.values is None or layer.keys.shape[-2] < end:
                raise CompositionError(f"cache holds fewer than {end} positions on some layer")
            keys.append(layer.keys[0, :, prev:end].detach().clone().contiguous())
            values.append(layer.values[0, :, prev:end].detach().clone().contiguous())
        out.append(
            KVSegment(
                token_ids=tuple(ids[prev:end]),
                keys=keys,
                values=values,
                start=prev,
                fingerprint=loaded.fingerprint,
                kind=SegmentKind.EXACT_PREFIX,
                context=context_hash(ids[:prev]) if prev else "",
                computed_on=loaded.numerics,
            )
        )
        prev = end
    return out


def forward(loaded: LoadedModel, cache: DynamicCache, ids: Sequence[int]) -> torch.Tensor:
    """Run `ids` on top of `cache` (which grows); returns the logits of the last position."""
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=loaded.device)
    with torch.no_grad(), loaded.forward_lock if loaded.rope_regime_limit is not None else contextlib.nullcontext():
        out = loaded.model(input_ids=input_ids, **with_cache(loaded.model, cache), use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float()
