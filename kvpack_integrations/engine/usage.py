"""What a generation cost and how it was served: the usage report every call returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Usage:
    """Token accounting and timing; `exact=False` whenever an approximate path was used.

    `input_tokens` and `cached_tokens` count prompt tokens, as the integrations' usage fields mean them;
    the soft tokens packet composition adds around each document are reported apart."""

    input_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    output_tokens: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    strategy: str = "text"
    exact: bool = True
    notes: list[str] = field(default_factory=list)
    steering: list[str] = field(default_factory=list)  # "name:alpha" of the vectors applied
    soft_tokens: int = 0  # cache positions of packet adapters' soft tokens, counted in neither token count

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    usage: Usage
    finish_reason: str


@dataclass
class StreamChunk:
    """A text delta; the last chunk carries `usage` and `finish_reason`."""

    text: str
    token_id: int | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
