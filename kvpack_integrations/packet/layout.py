"""Where packets sit in a knowledge prompt, and the attention pattern that matches composing them.

A knowledge prompt (`knowledge_prompt`) is: preamble (chat header, instruction) | document 1 | ... |
document n | tail (end of the system message, the question, the assistant header). In packet mode each
document is cached on its own at position 0, as `header + document + trailer`, then placed at its
offset by re-rotating its keys. That is the same as one forward pass over the whole sequence in which
each wrapped document attends only to itself (block-diagonal) while the preamble is causal and the
tail sees everything, with positions running through: RoPE attention depends only on relative
positions inside a document. The trainer uses that single pass as the student; the tests check that
composition and the single pass agree.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError
from ..knowledge.packs import knowledge_prompt
from ..prompts.knowledge import KnowledgeFormat


@dataclass(frozen=True)
class PacketPrompt:
    preamble: tuple[int, ...]
    documents: tuple[tuple[int, ...], ...]
    tail: tuple[int, ...]

    def text_ids(self) -> list[int]:
        """The plain prompt (no soft tokens): what full recompute or text stuffing prefills."""
        return [*self.preamble, *(t for d in self.documents for t in d), *self.tail]

    @classmethod
    def from_cuts(cls, ids: Sequence[int], cuts: Sequence[int]) -> PacketPrompt:
        """Split `ids` at `cuts` = [start of the first document, end of each document]."""
        if len(cuts) < 2 or list(cuts) != sorted(set(cuts)) or cuts[-1] > len(ids):
            raise InvalidInputError(f"document cuts {list(cuts)} do not split a {len(ids)}-token prompt")
        return cls(
            preamble=tuple(ids[: cuts[0]]),
            documents=tuple(tuple(ids[a:b]) for a, b in itertools.pairwise(cuts)),
            tail=tuple(ids[cuts[-1] :]),
        )


def check_packet_format(fmt: KnowledgeFormat) -> None:
    """Packets need an instruction piece: then every document's piece starts with the separator, so a
    document has the same tokens (and the same packet) wherever it is placed."""
    if not fmt.instruction:
        raise InvalidInputError(
            "packet composition needs a knowledge format with a non-empty instruction: without it the first "
            "document lacks the separator the others start with, and its tokens depend on its place"
        )


def document_ids(tokenizer: object, fact: str, fmt: KnowledgeFormat) -> tuple[int, ...]:
    """A document's tokens as they are cached on their own: its piece of a one-fact knowledge prompt."""
    check_packet_format(fmt)
    prompt = knowledge_prompt(tokenizer, [fact], "?", fmt)
    return tuple(prompt.token_ids[prompt.knowledge_cuts[-3] : prompt.knowledge_cuts[-2]])


def packet_prompt(tokenizer: object, facts: Sequence[str], question: str, fmt: KnowledgeFormat) -> PacketPrompt:
    """Split the knowledge prompt for `facts` into preamble, per-document tokens (cached alone) and tail.

    The documents are cut from this very rendering, so `text_ids()` is the prompt full recompute sees even
    where a template trims the system message (Llama 3.1: a last fact's trailing whitespace)."""
    check_packet_format(fmt)
    if not facts:
        raise InvalidInputError("packet composition needs at least one document")
    empty = [i for i, fact in enumerate(facts) if not fact.strip()]
    if empty:
        raise InvalidInputError(f"document {empty[0]} is empty: a packet needs text to cache")
    prompt = knowledge_prompt(tokenizer, facts, question, fmt)
    cuts = prompt.knowledge_cuts  # end of the instruction, end of each fact, start of the user turn
    return PacketPrompt.from_cuts(prompt.token_ids, cuts[-len(facts) - 2 : -1])


def block_mask(preamble: int, blocks: Sequence[int], tail: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [1, 1, L, L]: causal preamble, each block causal within itself only, tail causal."""
    total = preamble + sum(blocks) + tail
    allowed = torch.tril(torch.ones(total, total, dtype=torch.bool))
    start = preamble
    for size in blocks:
        allowed[start : start + size, :start] = False  # a cached document never saw what comes before it
        start += size
    mask = torch.zeros(total, total, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
