"""`naive` composition (ablation only): independently built caches concatenated at their own positions.

Each segment was computed on its own from position 0, so after concatenation the later ones carry
keys rotated for the wrong positions and never attended to the earlier ones. The paper measures the
cost (about 6 points); we keep it to reproduce that, and flag every use as approximate.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import CompositionError
from ..runtime.loader import LoadedModel
from ..segments.segment import KVSegment
from .cache_ops import cache_from_pieces
from .composed import ComposedCache
from .radix_tree import SegmentSlice


def compose_naive(loaded: LoadedModel, segments: Sequence[KVSegment]) -> ComposedCache:
    """Concatenate `segments` as they are (no re-positioning, no recompute)."""
    if not segments:
        raise CompositionError("naive composition needs at least one segment")
    for seg in segments:
        if seg.fingerprint != loaded.fingerprint:
            raise CompositionError(f"segment {seg.id} was built for another model")
    pieces = [SegmentSlice(seg, 0, len(seg)) for seg in segments]
    return ComposedCache(
        cache=cache_from_pieces(loaded, pieces),
        cached_tokens=sum(len(s) for s in segments),
        strategy="naive",
        exact=False,
        segment_ids=tuple(s.id for s in segments),
        notes=["naive concatenation: segments keep their own positions and never saw each other (approximate)"],
    )
