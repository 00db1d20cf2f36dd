"""`Projection`: PCA from the embedder's space to fewer dimensions, to store fewer bytes per fact.

Why: a 384-dim float32 vector is 1.5 KB of the ~2.6 KB a fact costs in Chroma (its HNSW file holds
every vector uncompressed). Centred PCA to 128 dims keeps the directions that separate the facts of
this knowledge base and drops the rest. It is fitted once, on the first batch added, and stored in
Chroma beside the facts (one component per entry) so every process projects the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidInputError

_MEAN_ID = "mean"


class Projection:
    """y = normalise((x - mean) @ components.T); components are orthonormal rows."""

    def __init__(self, mean: np.ndarray, components: np.ndarray) -> None:
        self.mean = mean.astype(np.float32)
        self.components = components.astype(np.float32)

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, vectors: np.ndarray, dims: int) -> Projection:
        if len(vectors) < dims:
            raise InvalidInputError(
                f"a knowledge base reduced to {dims} dims needs at least {dims} facts in its first add "
                f"to fit the projection, got {len(vectors)}: add more at once, or open the still-empty knowledge "
                f"base with other dims ({vectors.shape[1]}: full vectors)"
            )
        mean = vectors.mean(axis=0)
        _, _, vt = np.linalg.svd(vectors - mean, full_matrices=False)
        return cls(mean, vt[:dims])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        out = (vectors - self.mean) @ self.components.T
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def save(self, collection: Any) -> None:
        """One entry per component (`c0`, `c1`, ...) plus the mean, in an otherwise empty collection."""
        collection.add(
            ids=[_MEAN_ID] + [f"c{i}" for i in range(self.dims)],
            embeddings=[self.mean.tolist(), *self.components.tolist()],
            metadatas=[{"row": -1}] + [{"row": i} for i in range(self.dims)],
        )

    @classmethod
    def load(cls, collection: Any) -> Projection | None:
        found = collection.get(include=["embeddings", "metadatas"])
        if not found["ids"]:
            return None
        rows = {int(m["row"]): np.asarray(e, dtype=np.float32) for m, e in zip(found["metadatas"], found["embeddings"])}
        return cls(rows.pop(-1), np.stack([rows[i] for i in range(len(rows))]))
