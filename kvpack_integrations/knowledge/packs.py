"""Knowledge packs: facts rendered as the system message, cached once, reused by token prefix.

`knowledge_prompt` is the single place that turns facts + a question into token ids, so a pack built
now and a prompt rendered later line up token for token (and the radix tree checks that they do).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..composition.exact import materialize
from ..composition.radix_tree import RadixTree
from ..errors import InvalidInputError
from ..prompts.knowledge import KnowledgeFormat
from ..prompts.rendering import encode_with_offsets, render_messages, tokens_ending_by
from ..runtime.device import dtype_name
from ..runtime.loader import LoadedModel
from ..segments.pack_store import PackManifest, PackStore, validate_pack_name
from .facts import clean_facts


@dataclass(frozen=True)
class KnowledgePrompt:
    """Token ids of knowledge + conversation, and the pack's segment boundaries (token counts).

    `knowledge_cuts` end after each knowledge piece and, last, just before the first user message's
    content, so a pack also covers the template text between the knowledge and the question. A piece
    with no token of its own (its text shares one with what follows, e.g. facts joined by an empty
    separator) gets no cut: it is listed in `merged` (indices into `fmt.pieces(facts)`).
    """

    token_ids: list[int]
    knowledge_cuts: list[int]
    merged: tuple[int, ...] = ()


def _cuts(offsets: Sequence[tuple[int, int]], char_ends: Sequence[int]) -> tuple[list[int], tuple[int, ...]]:
    """Token counts at each end that adds a token, and the indices of the ends that add none."""
    cuts: list[int] = []
    merged: list[int] = []
    for i, end in enumerate(char_ends):
        n = tokens_ending_by(offsets, end)
        if n > (cuts[-1] if cuts else 0):
            cuts.append(n)
        else:
            merged.append(i)
    return cuts, tuple(merged)


def knowledge_prompt(
    tokenizer: Any,
    facts: Sequence[str],
    question: str | None,
    fmt: KnowledgeFormat,
    *,
    history: Sequence[tuple[str, str]] = (),
    raw: bool = False,
) -> KnowledgePrompt:
    """Render knowledge, earlier (question, answer) turns and the question with one chat-template call.

    `raw` is the paper's ablation: untemplated knowledge text followed by the templated conversation.
    """
    turns: list[dict[str, str]] = []
    for q, a in history:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    turns.append({"role": "user", "content": question if question is not None else "?"})
    if not raw:
        messages = [{"role": "system", "content": fmt.system_content(facts)}, *turns]
        rendered = render_messages(tokenizer, messages)
        base = rendered.part(0).chars[0]
        ends = [base + b for b in fmt.boundaries(facts)] + [rendered.part(1).chars[0]]
        cuts, merged = _cuts(rendered.offsets, ends)
        return KnowledgePrompt(list(rendered.token_ids), cuts, merged)
    text = fmt.system_content(facts)
    raw_ids, offsets = encode_with_offsets(tokenizer, text)
    ids = list(raw_ids)
    cuts, merged = _cuts(offsets, fmt.boundaries(facts))
    conversation = render_messages(tokenizer, turns)
    header = conversation.tokens_before(conversation.part(0).chars[0])
    if header:
        cuts.append(len(ids) + header)
    return KnowledgePrompt(ids + list(conversation.token_ids), cuts, merged)


def _refuse_merged(prompt: KnowledgePrompt, facts: Sequence[str], fmt: KnowledgeFormat) -> None:
    """A pack holds one segment per piece (what handles and fact indices point at): a piece that has no
    token of its own cannot be one, so the build is refused by name rather than shifting every later one."""
    pieces = fmt.pieces(facts)
    merged = [i for i in prompt.merged if i < len(pieces)]
    if not merged:
        return
    first = 1 if fmt.instruction else 0
    what = "the instruction" if merged[0] < first else f"fact {merged[0] - first} ({pieces[merged[0]][:40]!r})"
    raise InvalidInputError(
        f"{what} has no token of its own: with separator {fmt.separator!r} its text shares a token with what "
        "follows, so it cannot be cached as a segment of its own; use a separator such as '\\n\\n'"
    )


@dataclass
class BuildReport:
    manifest: PackManifest
    prefilled_tokens: int
    seconds: float
    bytes_on_disk: int


def build_pack(
    loaded: LoadedModel,
    tree: RadixTree,
    store: PackStore,
    name: str,
    facts: Sequence[str],
    *,
    fmt: KnowledgeFormat | None = None,
    storage_dtype: torch.dtype | None = None,
    raw: bool = False,
) -> BuildReport:
    """Cache `facts` as a chain of segments (one per fact, each computed after the ones before) and store it."""
    validate_pack_name(name)
    facts = clean_facts(facts)
    fmt = fmt or KnowledgeFormat()
    t0 = time.perf_counter()
    prompt = knowledge_prompt(loaded.tokenizer, facts, None, fmt, raw=raw)
    _refuse_merged(prompt, facts, fmt)
    segments, prefilled = materialize(loaded, tree, prompt.token_ids, prompt.knowledge_cuts)
    manifest = PackManifest(
        name=name,
        model_name=loaded.name,
        fingerprint=loaded.fingerprint,
        facts=facts,
        knowledge_format=fmt,
        segment_ids=[s.id for s in segments],
        storage_dtype=dtype_name(storage_dtype) if storage_dtype is not None else loaded.fingerprint.dtype,
        token_count=prompt.knowledge_cuts[-1],
        raw=raw,
        computed_on=loaded.numerics,
    )
    store.write(manifest, segments, storage_dtype)
    return BuildReport(manifest, prefilled, time.perf_counter() - t0, store.size_bytes(name))


def load_pack(loaded: LoadedModel, tree: RadixTree, store: PackStore, name: str) -> PackManifest:
    """Load a stored pack (verified against the loaded model) into the prefix tree."""
    manifest, segments = store.load_segments(name, loaded.fingerprint, device=loaded.device)
    tree.insert_chain(segments)
    return manifest
