"""The result of composition: a ready cache and what still has to be prefilled."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import DynamicCache


@dataclass
class ComposedCache:
    """A cache covering the first `cached_tokens` of a prompt, plus how it was made."""

    cache: DynamicCache
    cached_tokens: int
    strategy: str
    exact: bool
    segment_ids: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    soft_tokens: int = 0  # of the cached positions, trained soft tokens (packet adapters), not prompt tokens
    # the prompt tokens an `exact` cache covers: a prompt given it must start with them (None: unknown)
    token_ids: tuple[int, ...] | None = None
