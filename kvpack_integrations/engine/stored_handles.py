"""Segment handles of a request's documents, checked against their stores (and the pack they open made resident).

A retrieved document names the stored segment it came from. Before its text is composed we make sure
that segment still exists: a pack rebuilt or deleted since retrieval would otherwise pass silently.
When the first knowledge document is the first fact of a stored pack of this model (documents in
pack order), that pack is loaded into the prefix tree, verified, so the knowledge is served from disk
as far as its tokens match instead of being prefilled. Integrations call nothing here: `prepare` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from ..errors import CorruptSegmentError, FingerprintMismatchError, InvalidInputError, UnknownKnowledgeBaseError
from ..knowledge.bound import BoundPack
from ..prompts.knowledge import KnowledgeFormat
from ..segments.handles import SegmentHandle, check_handle
from ..segments.pack_store import PackManifest, PackStore
from .engine import Engine

# a stored segment that cannot serve the document: gone, rebuilt, damaged, another model, a --raw pack
_UNUSABLE = (UnknownKnowledgeBaseError, CorruptSegmentError, FingerprintMismatchError, InvalidInputError, OSError)


@lru_cache(maxsize=256)
def _bound(store: str, pack: str) -> BoundPack:
    """One `BoundPack` per stored pack and process (it rereads the manifest when the pack is rebuilt)."""
    return BoundPack(PackStore(store), pack)


def _verified(handle: SegmentHandle) -> tuple[BoundPack, PackManifest]:
    """The handle's pack and its current manifest, checked to still hold the handle's segment."""
    bound = _bound(handle.store, handle.pack)
    manifest = bound.manifest()
    if handle.segment_id and handle.segment_id not in manifest.segment_ids:
        raise CorruptSegmentError(
            f"segment {handle.segment_id} (document {handle.fact_index} of pack {handle.pack!r}) is no longer in "
            f"{handle.store}: the pack was rebuilt since the document was retrieved"
        )
    return bound, manifest


def check_stored_handles(
    engine: Engine,
    handles: Sequence[SegmentHandle],
    knowledge: Sequence[str],
    *,
    strict: bool,
    verify: bool,
    open_pack: bool,
    knowledge_format: KnowledgeFormat | None = None,
) -> list[str]:
    """Notes on the handles (another model, a segment gone); errors instead under `strict`.

    Without `verify` only the model is checked (the text is computed anyway). With `open_pack`, a
    handle to fact 0 of a pack whose first fact is the first knowledge document, laid out in the
    request's knowledge format, makes that pack resident in the engine's tree (the caller holds the
    engine's lock and its timing covers the load, as it does for a bound pack). A pack in another
    format would share no tokens with the prompt, so it is not loaded.
    """
    fmt = knowledge_format or KnowledgeFormat()
    notes: list[str] = []
    for handle in handles:
        note = check_handle(handle, engine.loaded.fingerprint, strict=strict)
        if note or not verify:
            notes += [note] if note else []
            continue
        try:
            bound, manifest = _verified(handle)
            opens = open_pack and handle.fact_index == 0 and bool(knowledge)
            if (
                opens
                and list(manifest.facts[:1]) == [knowledge[0]]
                and manifest.knowledge_format == fmt
                and bound.ensure_resident(engine.loaded, engine.tree)
            ):
                notes.append(f"pack {handle.pack!r} that the documents open loaded from {handle.store}")
        except _UNUSABLE as exc:
            if strict:
                raise
            notes.append(f"{exc}; the document's text was computed on this model instead")
    return list(dict.fromkeys(notes))
