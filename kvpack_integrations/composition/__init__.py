"""Layer 4: composition of cached segments into a ready cache."""

from .cache_ops import cache_from_pieces, empty_cache, forward, segments_from_cache
from .composed import ComposedCache
from .exact import compose_exact, materialize
from .naive import compose_naive
from .radix_tree import PrefixMatch, RadixTree, SegmentSlice

__all__ = [
    "ComposedCache",
    "PrefixMatch",
    "RadixTree",
    "SegmentSlice",
    "cache_from_pieces",
    "compose_exact",
    "compose_naive",
    "empty_cache",
    "forward",
    "materialize",
    "segments_from_cache",
]
