"""`exact` composition: longest token-prefix match, prefill only the rest.

Equivalent to text stuffing by construction: a causal decoder's cache of a prefix equals the first
positions of the cache of the whole prompt, and a slice is reused only where its token ids equal the
prompt's. Sequential composition (pack B computed with pack A in front) is the same mechanism.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..runtime.loader import LoadedModel
from ..segments.segment import KVSegment
from .cache_ops import (
    cache_from_pieces,
    check_context_window,
    check_rope_regime,
    check_sliding_window,
    empty_cache,
    forward,
    segments_from_cache,
)
from .composed import ComposedCache
from .radix_tree import RadixTree


def compose_exact(loaded: LoadedModel, tree: RadixTree, prompt_ids: Sequence[int]) -> ComposedCache:
    """Reuse the longest cached prefix, keeping at least the last prompt token to prefill.

    A LongRoPE prompt past its short-factor range reuses nothing: text stuffing rotates all its keys
    with the long factors, and every cached segment was computed with the short ones."""
    limit = loaded.rope_regime_limit
    if limit is not None and len(prompt_ids) > limit:
        note = (
            f"prefilled whole: {loaded.name} uses LongRoPE, whose factors change past {limit} positions, "
            f"and the prompt has {len(prompt_ids)}: no cached prefix equals its cache"
        )
        return ComposedCache(
            cache=empty_cache(loaded), cached_tokens=0, strategy="exact", exact=True, notes=[note], token_ids=()
        )
    match = tree.match(prompt_ids).truncated(max(0, len(prompt_ids) - 1))
    notes = inexact_reasons(loaded, [p.segment for p in match.pieces])
    cache = cache_from_pieces(loaded, match.pieces) if match.length else empty_cache(loaded)
    return ComposedCache(
        cache=cache,
        cached_tokens=match.length,
        strategy="exact",
        exact=not notes,
        segment_ids=tuple(dict.fromkeys(p.segment.id for p in match.pieces)),
        notes=notes,
        token_ids=tuple(prompt_ids[: match.length]),
    )


def inexact_reasons(loaded: LoadedModel, segments: Sequence[KVSegment]) -> list[str]:
    """Why reusing `segments` here is not exact (empty if it is): rounded storage, or K/V computed under
    other numerics (another device or attention kernel: the same computation, other rounding)."""
    reasons = []
    stored = sorted({s.storage_dtype for s in segments if not s.lossless})
    if stored:
        reasons.append(f"segments stored in {'/'.join(stored)} for a {loaded.fingerprint.dtype} model: not exact")
    foreign = sorted({s.computed_on for s in segments if not s.exact_under(loaded.numerics) and s.lossless})
    if foreign:
        reasons.append(
            f"segments computed on {', '.join(foreign)}, reused on "
            f"{loaded.numerics}: their K/V differ by rounding, not exact (rebuild the pack here to make it exact)"
        )
    return reasons


def materialize(
    loaded: LoadedModel, tree: RadixTree, ids: Sequence[int], boundaries: Sequence[int]
) -> tuple[list, int]:
    """Segments for `ids` cut at `boundaries`, each computed with everything before it in front.

    Reuses whatever prefix `tree` already holds, prefills the rest once, inserts the new segments into
    the tree, and returns (segments, tokens prefilled).
    """
    end = boundaries[-1]
    check_context_window(loaded, end)
    check_sliding_window(loaded, end)
    check_rope_regime(loaded, end)
    match = tree.match(ids[:end])
    lossy = next((i for i, p in enumerate(match.pieces) if not p.segment.exact_under(loaded.numerics)), None)
    if lossy is not None:  # recompute from there, so new segments never inherit rounded or foreign K/V,
        match = match.truncated(sum(len(p) for p in match.pieces[:lossy]))
        tree.forget(ids[:end], match.length)  # and the tree serves the recomputed ones from now on
    cache = cache_from_pieces(loaded, match.pieces) if match.length else empty_cache(loaded)
    if match.length < end:
        forward(loaded, cache, ids[match.length : end])
    segments = segments_from_cache(loaded, cache, ids, boundaries)
    for seg in segments:
        tree.insert(ids[: seg.start], seg)
    return segments, end - match.length
