"""How facts become the text of a system message, and where each fact ends in it.

The knowledge is one system message: an instruction, then the facts, joined by a separator. The
layout is append-only (adding a fact only extends the text), so the rendering for k+1 facts starts
with the rendering for k facts and sequential composition reuses every earlier segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_INSTRUCTION = (
    "Answer the user's question using the knowledge below. Reply with a short answer only, "
    "a few words, without explanation."
)


@dataclass(frozen=True)
class KnowledgeFormat:
    """Layout of knowledge in the system message."""

    instruction: str = DEFAULT_INSTRUCTION
    separator: str = "\n\n"

    def pieces(self, facts: Sequence[str]) -> list[str]:
        return ([self.instruction] if self.instruction else []) + list(facts)

    def system_content(self, facts: Sequence[str]) -> str:
        return self.separator.join(self.pieces(facts))

    def boundaries(self, facts: Sequence[str]) -> list[int]:
        """Character offsets (within the system content) where each piece ends."""
        ends, pos = [], 0
        for i, piece in enumerate(self.pieces(facts)):
            pos += (len(self.separator) if i else 0) + len(piece)
            ends.append(pos)
        return ends

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KnowledgeFormat:
        return cls(instruction=str(data.get("instruction", "")), separator=str(data.get("separator", "\n\n")))
