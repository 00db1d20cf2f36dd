"""Segment handles: how a retrieved document says which stored segment it came from.

A handle travels in a document's metadata (plain JSON types, so frameworks can serialise it). It
names the store, pack and fact, the segment id, and the fingerprint digest of the model that built
it; a consumer on another model must not treat the document as cached on its own model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import FingerprintMismatchError, InvalidInputError
from ..runtime.fingerprint import Fingerprint

HANDLE_KEY = "kvpack"


@dataclass(frozen=True)
class SegmentHandle:
    store: str
    pack: str
    fact_index: int
    segment_id: str
    fingerprint: str
    model_name: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SegmentHandle:
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"a kvpack segment handle must be a mapping, got {type(data).__name__}")
        missing = [f for f in cls.__dataclass_fields__ if f not in data]
        if missing:
            raise InvalidInputError(f"kvpack segment handle lacks {', '.join(missing)}")
        try:
            return cls(
                store=str(data["store"]),
                pack=str(data["pack"]),
                fact_index=int(data["fact_index"]),
                segment_id=str(data["segment_id"]),
                fingerprint=str(data["fingerprint"]),
                model_name=str(data["model_name"]),
            )
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"kvpack segment handle is malformed: {exc}") from exc


def check_handle(handle: SegmentHandle, fingerprint: Fingerprint, *, strict: bool) -> str | None:
    """None when the handle was made on this model; else a note (or, if `strict`, an error) naming both."""
    if handle.fingerprint == fingerprint.digest:
        return None
    message = (
        f"document {handle.fact_index} of pack {handle.pack!r} in {handle.store} was cached by model "
        f"{handle.model_name!r} (fingerprint {handle.fingerprint}), not by the loaded model (fingerprint "
        f"{fingerprint.digest})"
    )
    if strict:
        raise FingerprintMismatchError(message + "; its cache cannot be used here")
    return message + "; its text was computed on this model instead"
