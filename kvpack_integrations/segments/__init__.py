"""Layer 3: cache segments, their files, and the pack store."""

from .pack_store import PackManifest, PackStore, default_store_dir, validate_pack_name
from .segment import KVSegment, SegmentKind
from .serialization import load_segment, save_segment

__all__ = [
    "KVSegment",
    "PackManifest",
    "PackStore",
    "SegmentKind",
    "default_store_dir",
    "load_segment",
    "save_segment",
    "validate_pack_name",
]
