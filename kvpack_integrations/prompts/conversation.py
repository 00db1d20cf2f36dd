"""A whole chat request (knowledge, system text, turns, tool calls and results, tools) as ONE rendering.

This is where knowledge sits exactly where text stuffing would put it:

* knowledge pieces (a bound pack's facts, then documents passed with the call) open the system
  message in the `KnowledgeFormat` layout, so a stored pack's tokens are a prefix of the rendering;
* the caller's own system text follows them, then (for templates without tool support) the tool list;
* documents returned by tools sit inside their tool-result turn, where the tool's text would be.

Framework objects never reach this module: integrations translate their messages to `ChatTurn`s.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import TemplateError
from .knowledge import KnowledgeFormat
from .rendering import MOVED_SYSTEM_NOTE, RenderedPrompt, find_in_rendering, fold_system, render_messages
from .templates import system_stays_first
from .tools import (
    fallback_tool_response,
    fallback_tools_block,
    format_tool_call_block,
    template_call_id,
    template_supports_tools,
)

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCallTurn:
    """A tool call made by the assistant in an earlier turn."""

    name: str
    arguments: Mapping[str, Any]
    id: str | None = None


@dataclass(frozen=True)
class ChatTurn:
    """One message of a conversation, framework-neutral.

    `documents` are texts delivered in this turn (a retriever tool's results); each must occur in
    `content`, and the rendering reports where, so they become their own cache segments.
    """

    role: str
    content: str
    tool_calls: tuple[ToolCallTurn, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    is_error: bool = False
    documents: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise TemplateError(f"unknown message role {self.role!r}: use one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise TemplateError(f"a {self.role} message needs string content, got {type(self.content).__name__}")


@dataclass(frozen=True)
class ConversationPrompt:
    """Token ids of the request plus where knowledge and documents sit in them (token spans)."""

    rendered: RenderedPrompt
    knowledge_tokens: int
    # token counts at the end of the knowledge instruction and at the end of every knowledge piece
    # (where packet composition cuts the prompt); empty when the pieces cannot be cut on token bounds
    knowledge_cuts: tuple[int, ...] = ()
    document_spans: tuple[tuple[int, int], ...] = ()
    template_messages: tuple[Mapping[str, Any], ...] = ()
    native_tools: bool = False
    notes: tuple[str, ...] = ()  # what the template changed in the conversation, for the usage report

    @property
    def token_ids(self) -> list[int]:
        return list(self.rendered.token_ids)


def _system_content(knowledge: Sequence[str], fmt: KnowledgeFormat, system: str, tools_block: str) -> str:
    parts = [fmt.system_content(knowledge)] if knowledge else []
    parts += [p for p in (system, tools_block) if p]
    return fmt.separator.join(parts)


def _assistant(turn: ChatTurn, native_tools: bool, position: int) -> dict[str, Any]:
    if not turn.tool_calls:
        return {"role": "assistant", "content": turn.content}
    if native_tools:
        calls = [
            {
                "id": template_call_id(c.id, c.name, c.arguments, position + i),
                "type": "function",
                "function": {"name": c.name, "arguments": dict(c.arguments)},
            }
            for i, c in enumerate(turn.tool_calls)
        ]
        return {"role": "assistant", "content": turn.content, "tool_calls": calls}
    blocks = "\n".join(format_tool_call_block(c.name, c.arguments) for c in turn.tool_calls)
    return {"role": "assistant", "content": f"{turn.content}\n{blocks}" if turn.content else blocks}


def _tool_message(turn: ChatTurn, native_tools: bool, call_ids: Mapping[str, str]) -> dict[str, Any]:
    content = f"Error: {turn.content}" if turn.is_error else turn.content
    if native_tools:
        message: dict[str, Any] = {"role": "tool", "content": content}
        if turn.tool_call_id is not None:
            message["tool_call_id"] = call_ids.get(turn.tool_call_id, turn.tool_call_id)
        if turn.name:
            message["name"] = turn.name
        return message
    return {"role": "user", "content": fallback_tool_response(turn.content, turn.is_error)}


def _merge_same_roles(messages: list[dict[str, Any]], separator: str) -> list[dict[str, Any]]:
    """Join consecutive user (or assistant) turns, for templates that demand strict alternation."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"] and m["role"] in ("user", "assistant") and "tool_calls" not in m:
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}{separator}{m['content']}"}
        else:
            out.append(dict(m))
    return out


def _one_call_per_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant turn with several tool calls as consecutive turns of one call each (its text on the first)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if len(calls) < 2:
            out.append(m)
            continue
        out += [{**m, "content": m["content"] if i == 0 else "", "tool_calls": [c]} for i, c in enumerate(calls)]
    return out


def _template_notes(
    rendered: RenderedPrompt, given: list[dict[str, Any]], rendered_as: list[dict[str, Any]]
) -> tuple[str, ...]:
    """What the template changed in the conversation, said in the usage report."""
    notes = []
    if len(rendered_as) > len(given) and any(len(m.get("tool_calls") or []) > 1 for m in given):
        notes.append(
            "this chat template takes one tool call per assistant turn: turns with several calls were rendered "
            "as one turn per call"
        )
    if rendered.dropped:
        notes.append(
            "this chat template leaves out the text of an assistant turn that calls tools: the model does not see it "
            "(text stuffing through the same template would not show it either)"
        )
    return tuple(notes)


def _to_template_messages(
    turns: Sequence[ChatTurn], system: str | None, native_tools: bool, separator: str
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
    call_ids: dict[str, str] = {}
    for position, turn in enumerate(turns):
        if turn.role == "assistant":
            message = _assistant(turn, native_tools, position)
            for original, rendered in zip(turn.tool_calls, message.get("tool_calls", [])):
                if original.id:
                    call_ids[original.id] = rendered["id"]
            messages.append(message)
        elif turn.role == "tool":
            message = _tool_message(turn, native_tools, call_ids)
            previous = messages[-1] if messages else None
            if not native_tools and previous is not None and previous.get("_tool_results"):
                previous["content"] += "\n" + message["content"]  # results of one step share a turn
            else:
                messages.append({**message, "_tool_results": not native_tools})
        else:
            messages.append({"role": turn.role, "content": turn.content})
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in messages]


def _render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    separator: str,
    thinking: bool | None,
) -> tuple[RenderedPrompt, list[dict[str, Any]]]:
    """Render; templates that demand strict alternation get consecutive same-role turns merged, templates
    that take one tool call per assistant turn (Llama 3.1) get a turn of several calls split."""
    try:
        return render_messages(tokenizer, messages, tools=tools, thinking=thinking), messages
    except TemplateError as exc:
        if "single tool" in str(exc).lower() and (split := _one_call_per_turn(messages)) != messages:
            return render_messages(tokenizer, split, tools=tools, thinking=thinking), split
        if "alternate" not in str(exc).lower():
            raise
        merged = _merge_same_roles(messages, separator)
        if merged == messages:
            order = " -> ".join(str(m["role"]) for m in messages)
            raise TemplateError(
                f"this chat template refuses this order of turns ({order}); some templates (Mistral) allow no "
                f"user turn right after tool results: {exc}"
            ) from exc
        try:
            return render_messages(tokenizer, merged, tools=tools, thinking=thinking), merged
        except TemplateError as exc2:
            raise TemplateError(
                f"this chat template forbids this sequence of roles even after merging consecutive turns: {exc2}"
            ) from exc2


def render_conversation(
    tokenizer: Any,
    turns: Sequence[ChatTurn],
    *,
    knowledge: Sequence[str] = (),
    knowledge_format: KnowledgeFormat | None = None,
    tools: Sequence[Mapping[str, Any]] = (),
    thinking: bool | None = False,
) -> ConversationPrompt:
    """Render knowledge + turns (+ tools, in OpenAI function format) with one chat-template call.

    Leading system turns are joined into the one system message, after the knowledge; the template's
    own default system prompt is used only when there is neither knowledge, system text nor tools.
    """
    if not turns or all(t.role == "system" for t in turns):
        raise TemplateError("a conversation needs at least one non-system message")
    fmt = knowledge_format or KnowledgeFormat()
    native_tools = bool(tools) and template_supports_tools(tokenizer)
    lead = 0
    while turns[lead].role == "system":
        lead += 1
    system_text = fmt.separator.join(t.content for t in turns[:lead] if t.content)
    tools_block = fallback_tools_block(tools) if tools and not native_tools else ""
    has_system = bool(knowledge) or lead > 0 or bool(tools_block)
    system = _system_content(knowledge, fmt, system_text, tools_block) if has_system else None
    rest = list(turns[lead:])
    if system is not None and not system_stays_first(tokenizer):
        # the template moves the system text (Mistral: into the last user turn), which would put the
        # knowledge after the question and change every step's prefix: fold it into the first turn
        first = next((i for i, t in enumerate(rest) if t.role == "user"), None)
        if first is None:
            raise TemplateError("this chat template moves the system message and there is no user turn to hold it")
        rest[first] = ChatTurn("user", f"{system}{fmt.separator}{rest[first].content}")
        system = None
        moved = [MOVED_SYSTEM_NOTE]
    else:
        moved = []
    given = _to_template_messages(rest, system, native_tools, fmt.separator)
    rendered, messages = _render(tokenizer, given, tools if native_tools else None, fmt.separator, thinking)
    return ConversationPrompt(
        rendered=rendered,
        knowledge_tokens=_knowledge_tokens(rendered, knowledge, fmt),
        knowledge_cuts=_knowledge_cuts(rendered, knowledge, fmt),
        document_spans=_document_spans(rendered, rest),
        template_messages=tuple(fold_system(messages) if rendered.system_folded else messages),  # as rendered
        native_tools=native_tools,
        notes=(*moved, *_template_notes(rendered, given, messages)),
    )


def _knowledge_tokens(rendered: RenderedPrompt, knowledge: Sequence[str], fmt: KnowledgeFormat) -> int:
    """Tokens up to the end of the last knowledge piece (0 without knowledge)."""
    if not knowledge:
        return 0
    span = find_in_rendering(rendered.text, fmt.system_content(knowledge), 0)
    if span is None:
        raise TemplateError("the knowledge text does not appear verbatim in the rendered prompt")
    return rendered.tokens_before(span[1])


def _knowledge_cuts(rendered: RenderedPrompt, knowledge: Sequence[str], fmt: KnowledgeFormat) -> tuple[int, ...]:
    """Token counts at the end of the instruction and of each knowledge piece, when all fall on token bounds."""
    if not knowledge or not fmt.instruction:
        return ()
    content = fmt.system_content(knowledge)
    span = find_in_rendering(rendered.text, content, 0)
    if span is None or span[1] - span[0] != len(content):  # the template escaped it: no character map
        return ()
    cuts = tuple(rendered.tokens_before(span[0] + end) for end in fmt.boundaries(knowledge))
    if any(b <= a for a, b in itertools.pairwise(cuts)):
        return ()
    return cuts


def _document_spans(rendered: RenderedPrompt, turns: Sequence[ChatTurn]) -> tuple[tuple[int, int], ...]:
    """Token spans of the documents delivered in tool turns, searched in order after the knowledge."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for turn in turns:
        for doc in turn.documents:
            span = find_in_rendering(rendered.text, doc, cursor)
            if span is None:
                raise TemplateError(f"a tool turn's document does not occur in its content: {doc[:40]!r}")
            start = rendered.tokens_before(span[0])
            spans.append((start, rendered.tokens_before(span[1])))
            cursor = span[1]
    return tuple(spans)
