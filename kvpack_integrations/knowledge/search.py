"""Similarity search over a stored pack's facts, returning each hit with its segment handle.

This is the store behind `KVPackRetriever` until the Chroma knowledge base lands: the pack's facts
are embedded once per process (a pack fits one context window, so this is small) and ranked by cosine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError
from ..runtime.embedder import Embedder
from ..segments.handles import SegmentHandle
from ..segments.pack_store import PackManifest, PackStore


def check_k(k: object) -> None:
    """How many results a search returns must be a positive integer (not a bool, not a float)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")


def fact_segments(manifest: PackManifest) -> list[str]:
    """Each fact's segment id. A pack has one segment per piece (the instruction, if any, then each fact),
    then one for the template up to the question (a raw pack may have none). A pack that does not (built
    before facts sharing a token were refused) cannot say which segment holds a fact: "" (unknown)."""
    first = 1 if manifest.knowledge_format.instruction else 0
    pieces = first + len(manifest.facts)
    ids = manifest.segment_ids
    if len(ids) == pieces + 1 or (manifest.raw and len(ids) == pieces):
        return list(ids[first:pieces])
    return [""] * len(manifest.facts)


@dataclass(frozen=True)
class FactHit:
    text: str
    score: float
    handle: SegmentHandle


class PackSearcher:
    """Ranks one pack's facts against a query; re-embeds if the pack was rebuilt."""

    def __init__(self, store: PackStore, name: str, embedder: Embedder) -> None:
        self.store = store
        self.name = name
        self.embedder = embedder
        # one tuple, replaced whole: concurrent searches during a rebuild never pair one build's manifest
        # with another's vectors or segment ids
        self._state: tuple[PackManifest, np.ndarray, list[str]] | None = None

    def _index(self) -> tuple[PackManifest, np.ndarray, list[str]]:
        manifest = self.store.current_manifest(self.name)
        state = self._state
        if state is None or state[0] is not manifest:  # first use, or the pack was rebuilt
            state = (manifest, self.embedder.embed(list(manifest.facts)), fact_segments(manifest))
            self._state = state
        return state

    def search(self, query: str, k: int) -> list[FactHit]:
        if not isinstance(query, str) or not query.strip():
            raise InvalidInputError("the retrieval query is empty")
        check_k(k)
        manifest, vectors, segments = self._index()
        scores = vectors @ self.embedder.embed([query])[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return [
            FactHit(
                text=manifest.facts[i],
                score=float(scores[i]),
                handle=SegmentHandle(
                    store=str(self.store.root),
                    pack=self.name,
                    fact_index=int(i),
                    segment_id=segments[int(i)],
                    fingerprint=manifest.fingerprint.digest,
                    model_name=manifest.model_name,
                ),
            )
            for i in order
        ]
