"""Render messages with ONE `apply_chat_template` call and know the token span of every part.

Rendering the system and user parts in separate calls duplicates BOS or adds empty headers, and
tokenising pieces separately is not tokenising the whole (BPE merges across boundaries). So we render
the whole conversation once, tokenise that text once, and locate each message's content by character
offsets; every split is a token boundary of that single rendering.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import TemplateError
from .templates import PROBE_USER, probe_turn, render_probe, system_stays_first, template_kwargs

Message = Mapping[str, Any]
_FOLD_SEPARATOR = "\n\n"
_THINK_CLOSE = "</think>"
MOVED_SYSTEM_NOTE = (
    "this chat template moves the system message into the last user turn; it was kept (knowledge included) "
    "at the top of the first user turn instead, so every step shares its prefix: apply_chat_template on the "
    "same messages would place it elsewhere"
)


@dataclass(frozen=True)
class PartSpan:
    """Where one message's content sits in the rendering (characters and overlapping tokens)."""

    index: int
    role: str
    chars: tuple[int, int]
    tokens: tuple[int, int]


@dataclass(frozen=True)
class RenderedPrompt:
    """The single rendering of a conversation: text, token ids, offsets and part spans."""

    text: str
    token_ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    parts: tuple[PartSpan, ...]
    system_folded: bool = False
    dropped: tuple[int, ...] = ()  # messages calling tools whose text the template leaves out (Llama 3.1, Mistral)

    def __len__(self) -> int:
        return len(self.token_ids)

    def part(self, index: int) -> PartSpan:
        """The span of message `index` (index in the messages as given)."""
        for span in self.parts:
            if span.index == index:
                return span
        raise KeyError(f"message {index} has no span in this rendering")

    def tokens_before(self, char_pos: int) -> int:
        """Number of leading tokens that end at or before `char_pos` (a safe prefix cut)."""
        return tokens_ending_by(self.offsets, char_pos)


def tokens_ending_by(offsets: Sequence[tuple[int, int]], char_pos: int) -> int:
    """Number of leading tokens (by character offsets) that end at or before `char_pos`."""
    count = 0
    for _, end in offsets:
        if end > char_pos:
            break
        count += 1
    return count


def fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Templates without a system role (Gemma) get the system text at the top of the first user turn."""
    system, rest = messages[0], messages[1:]
    if not rest or rest[0].get("role") != "user":
        raise TemplateError(
            "this chat template has no system role and the system message is not followed by a user one"
        )
    first = dict(rest[0])
    first["content"] = f"{system['content']}{_FOLD_SEPARATOR}{first['content']}"
    return [first, *rest[1:]]


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except ValueError as exc:
        raise TemplateError(f"the tokenizer has no usable chat template: {exc}") from exc
    if not isinstance(text, str):
        raise TemplateError("apply_chat_template did not return text")
    return text


def _needles(content: str) -> list[str]:
    """How a text may appear in a rendering: as is, trimmed, JSON-escaped (Llama 3.1's tool turns), or
    without its thinking (Qwen3 and DeepSeek-R1 templates drop `<think>...</think>` from earlier turns)."""
    escaped = json.dumps(content, ensure_ascii=False)[1:-1]
    needles = [content, content.strip(), escaped]
    if _THINK_CLOSE in content:
        needles.append(content.rsplit(_THINK_CLOSE, 1)[1].strip())
    return list(dict.fromkeys(needles))


def find_in_rendering(text: str, content: str, cursor: int) -> tuple[int, int] | None:
    """Character span of `content` in `text` at or after `cursor` (any of its renderings), or None."""
    for needle in _needles(content):
        pos = text.find(needle, cursor) if needle else -1
        if pos >= 0:
            return pos, pos + len(needle)
    return None


def _locate(text: str, content: str, cursor: int) -> tuple[int, int]:
    """Find a message's content at or after `cursor`; templates may trim or JSON-escape it."""
    if not content.strip():
        return cursor, cursor
    span = find_in_rendering(text, content, cursor)
    if span is None:
        raise TemplateError(
            "could not locate a message's content in the rendered prompt (the chat template rewrites it); "
            f"content starts with {content[:40]!r}"
        )
    return span


def _drops_text_beside_calls(tokenizer: Any, kwargs: Mapping[str, Any]) -> bool:
    """Whether the template leaves out the text of an assistant turn that calls tools (Llama 3.1 and
    Mistral do), learned once per template by rendering a probe: searching the rendering for the text
    would find it elsewhere when it also occurs later (in the call's arguments, in a tool result). A
    template that cannot render the probe is searched as for any turn."""
    sentinel = "kvpacksentinel"
    probe = [PROBE_USER, probe_turn(sentinel)]
    text = render_probe(tokenizer, probe, kwargs.get("tools"), kwargs.get("enable_thinking"))
    return text is not None and sentinel not in text


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """Token ids and character offsets of `text` (no special tokens added: the template has them)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("token offsets need a fast (Rust) tokenizer; load the model with use_fast=True")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = tuple(int(t) for t in encoding["input_ids"])
    offsets = tuple((int(a), int(b)) for a, b in encoding["offset_mapping"])
    return ids, offsets


def _checked_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Plain dict copies of `messages`, once they are shown to be a non-empty list of role/content maps."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TemplateError(f"messages must be a list of {{'role', 'content'}} mappings, got {type(messages).__name__}")
    if not messages:
        raise TemplateError("there are no messages to render")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TemplateError(f"message {i} is a {type(m).__name__}, not a {{'role', 'content'}} mapping")
        if not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise TemplateError(f"message {i} needs a string 'role' and a string 'content'")
        msgs.append(dict(m))
    return msgs


def render_messages(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    thinking: bool | None = False,
) -> RenderedPrompt:
    """Render `messages` once and return tokens with per-message spans.

    `thinking=False` turns off Qwen3-style thinking (a capped answer with thinking on scores ~0);
    `None` leaves the template's default.
    """
    msgs = _checked_messages(messages)
    kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt, **template_kwargs(tokenizer, thinking)}
    if tools:
        kwargs["tools"] = list(tools)
    system_first = msgs[0]["role"] == "system"
    # a template that moves the system text into the last user turn (Mistral) would put it after the
    # earlier turns, where no span of it is a prefix: with more than one user turn it is folded into the first
    folded = system_first and sum(m["role"] == "user" for m in msgs) > 1 and not system_stays_first(tokenizer)
    try:
        text = _apply_template(tokenizer, fold_system(msgs) if folded else msgs, **kwargs)
    except TemplateError:
        raise
    except Exception as exc:  # jinja's raise_exception: "System role not supported" (Gemma), "roles must
        # alternate" (Mistral v0.1, Mixtral): a template without a system role, whatever its message says
        if not system_first or folded:
            raise TemplateError(f"chat template failed: {exc}") from exc
        try:
            text = _apply_template(tokenizer, fold_system(msgs), **kwargs)
        except TemplateError:
            raise
        except Exception as exc2:
            raise TemplateError(
                f"chat template failed: {exc}; and with the system text folded into the first user turn: {exc2}"
            ) from exc2
        folded = True

    ids, offsets = encode_with_offsets(tokenizer, text)

    parts = []
    dropped = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m.get("tool_calls") and m["content"].strip() and _drops_text_beside_calls(tokenizer, kwargs):
            dropped.append(i)  # the template renders only the calls: nothing of the text to locate
            start, end = cursor, cursor
        else:
            start, end = _locate(text, m["content"], cursor)
        first = next((t for t, (_, e) in enumerate(offsets) if e > start), len(ids))
        last = next((t for t in range(len(ids) - 1, -1, -1) if offsets[t][0] < end), first - 1) + 1
        parts.append(PartSpan(index=i, role=m["role"], chars=(start, end), tokens=(first, max(first, last))))
        cursor = end
    return RenderedPrompt(
        text=text, token_ids=ids, offsets=offsets, parts=tuple(parts), system_folded=folded, dropped=tuple(dropped)
    )
