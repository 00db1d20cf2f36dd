"""`BankLayout`: which centroids and which fact label belong to a knowledge base's current banks.

Why: a rebalance rewrites every fact's bank and every centroid, and Chroma has no transactions. So the
banks are double-buffered: each generation's centroids carry their generation (ids `g{G}-bank-{b}`),
and facts hold two label fields that generations alternate between. A rebalance writes the next
generation beside the current one, then stamps it in the facts collection's metadata (one write), then
deletes the old centroids. Readers follow the stamp, so they route with one generation's centroids and
labels throughout, and an interrupted rebalance leaves the current generation whole.

A base built before generations has untagged centroids (`bank-{b}`) and labels in `bank`; it routes as
before and moves to this layout at its next rebalance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LABEL_FIELDS = ("bank", "kvpack_bank")  # the fact metadata keys generations alternate between
_FIELD_KEY = "kvpack_bank_field"
_GENERATION_KEY = "kvpack_generation"


@dataclass(frozen=True)
class BankLayout:
    generation: int
    field: str = LABEL_FIELDS[0]  # the fact metadata key holding this generation's bank
    tagged: bool = False  # centroids carry their generation; False: a base built before generations

    @classmethod
    def of(cls, meta: Mapping[str, Any]) -> BankLayout:
        """The layout stamped in a facts collection's metadata."""
        generation = int(meta.get(_GENERATION_KEY, 0))
        field = meta.get(_FIELD_KEY)
        return cls(generation, str(field), True) if field in LABEL_FIELDS else cls(generation)

    def centroids(self) -> dict[str, Any]:
        """Chroma `where` filter for this generation's centroids."""
        if self.tagged:
            return {"generation": self.generation}
        # untagged centroids (Chroma's `$ne` matches a missing key); the only tagged ones such a base can
        # hold are those of a first rebalance under way, which will be generation + 1
        return {"generation": {"$ne": self.generation + 1}}

    def holds(self, centroid: Mapping[str, Any]) -> bool:
        """Whether a centroid's metadata matches `centroids()`."""
        generation = centroid.get("generation")
        return generation == self.generation if self.tagged else generation != self.generation + 1

    def following(self) -> BankLayout:
        """The layout a rebalance writes: the next generation, into the other label field."""
        other = LABEL_FIELDS[1] if self.field == LABEL_FIELDS[0] else LABEL_FIELDS[0]
        return BankLayout(self.generation + 1, other, True)

    def centroid_id(self, bank: int) -> str:
        return f"g{self.generation}-bank-{bank}"

    def stamp(self) -> dict[str, Any]:
        """The metadata entries that make this layout the current one."""
        return {_GENERATION_KEY: self.generation, _FIELD_KEY: self.field}
