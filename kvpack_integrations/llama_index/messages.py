"""LlamaIndex chat messages and nodes -> the engine's framework-neutral `ChatTurn`s (and calls back).

Only translation lives here. Messages are read block by block: text blocks are the text (joined by a
newline, as `ChatMessage.content` joins them), `ToolCallBlock`s (or OpenAI-style
`additional_kwargs["tool_calls"]`) are the assistant's calls, and the text blocks of a tool result are
the documents delivered in that turn, so each becomes its own cache segment. Nodes handed to a call
(`nodes=`) are knowledge: their text as the LLM would see it (`MetadataMode.LLM`), plus the segment
handle in their metadata when they came from a kvpack store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from llama_index.core.base.llms.types import (
    CacheControl,
    CachePoint,
    ChatMessage,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore

from ..engine.tool_calls import ParsedToolCall
from ..errors import InvalidInputError
from ..prompts.conversation import ChatTurn, ToolCallTurn
from ..segments.handles import HANDLE_KEY, SegmentHandle

_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "chatbot": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
}
_SKIPPED = (ThinkingBlock, CachePoint, CacheControl)  # not part of the visible text


def _role(message: ChatMessage) -> str:
    role = getattr(message.role, "value", message.role)
    return str(role)


def text_blocks(message: ChatMessage, where: str) -> list[str]:
    """The message's text blocks; images, audio, documents and other non-text blocks are refused."""
    texts = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, (ToolCallBlock, *_SKIPPED)):
            continue
        else:
            kind = getattr(block, "block_type", type(block).__name__)
            raise InvalidInputError(f"{where}: content blocks of type {kind!r} are not supported (text only)")
    return texts


def tool_arguments(raw: Any, where: str) -> dict[str, Any]:
    """A call's arguments as a dict: JSON text is parsed; invalid JSON or a non-object is refused, naming `where`."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{where}: tool-call arguments are not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{where}: tool-call arguments must be an object, got {type(raw).__name__}")
    return raw


def tool_calls_of(message: ChatMessage, where: str) -> tuple[ToolCallTurn, ...]:
    """The assistant's calls: `ToolCallBlock`s, else OpenAI-style `additional_kwargs["tool_calls"]`."""
    blocks = [b for b in message.blocks if isinstance(b, ToolCallBlock)]
    if blocks:
        return tuple(ToolCallTurn(b.tool_name, tool_arguments(b.tool_kwargs, where), b.tool_call_id) for b in blocks)
    calls = []
    for raw in message.additional_kwargs.get("tool_calls") or []:
        function = raw.get("function") if isinstance(raw, dict) else getattr(raw, "function", None)
        name = function.get("name") if isinstance(function, dict) else getattr(function, "name", None)
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"{where}: a tool call in additional_kwargs has no function name")
        arguments = function.get("arguments") if isinstance(function, dict) else getattr(function, "arguments", None)
        call_id = raw.get("id") if isinstance(raw, dict) else getattr(raw, "id", None)
        calls.append(ToolCallTurn(name, tool_arguments(arguments or {}, where), call_id))
    return tuple(calls)


def _tool_turn(message: ChatMessage, where: str) -> ChatTurn:
    texts = text_blocks(message, where)
    extra = message.additional_kwargs
    return ChatTurn(
        "tool",
        "\n".join(texts),  # what ChatMessage.content gives, i.e. the text a text-only model is sent
        tool_call_id=extra.get("tool_call_id"),
        name=extra.get("name") or extra.get("tool_name"),
        is_error=bool(extra.get("is_error", False)),
        documents=tuple(t for t in texts if t.strip()),
    )


def to_turns(messages: Sequence[ChatMessage]) -> list[ChatTurn]:
    """Translate a LlamaIndex message list into engine turns.

    Tool results are text here: unlike LangChain's `ToolMessage` artifacts, a LlamaIndex tool message
    carries no segment handles, so knowledge reaches the model as segments through `nodes=`.
    """
    turns: list[ChatTurn] = []
    for i, message in enumerate(messages):
        if not isinstance(message, ChatMessage):
            raise InvalidInputError(f"message {i}: expected a llama_index ChatMessage, got {type(message).__name__}")
        where = f"message {i} ({_role(message)})"
        role = _ROLES.get(_role(message))
        if role is None:
            raise InvalidInputError(f"{where}: unsupported message role")
        if role == "tool":
            turns.append(_tool_turn(message, where))
        elif role == "assistant":
            text = "\n".join(text_blocks(message, where))
            turns.append(ChatTurn("assistant", text, tool_calls=tool_calls_of(message, where)))
        else:
            turns.append(ChatTurn(role, "\n".join(text_blocks(message, where))))
    return turns


def handle_of(node: BaseNode) -> SegmentHandle | None:
    """The segment handle a kvpack retriever put in the node's metadata, if any (malformed: an error)."""
    raw = (node.metadata or {}).get(HANDLE_KEY)
    return SegmentHandle.from_dict(raw) if raw is not None else None


@dataclass(frozen=True)
class NodeDocument:
    text: str
    handle: SegmentHandle | None


def node_documents(nodes: Any) -> list[NodeDocument]:
    """`nodes=` on a call: `NodeWithScore`s, nodes or strings, in order -> texts and segment handles.

    A node's text is what a text synthesizer would send (`get_content(MetadataMode.LLM)`), stripped;
    empty ones are dropped, as LlamaIndex's compact synthesizer drops them.
    """
    if nodes is None:
        return []
    if isinstance(nodes, (str, BaseNode, NodeWithScore)):
        nodes = [nodes]
    if not isinstance(nodes, Iterable):
        raise InvalidInputError(f"nodes= takes a list of nodes or strings, got {type(nodes).__name__}")
    out = []
    for i, item in enumerate(nodes):
        node = item.node if isinstance(item, NodeWithScore) else item
        handle = None
        if isinstance(node, BaseNode):
            text = node.get_content(metadata_mode=MetadataMode.LLM)
            try:
                handle = handle_of(node)
            except InvalidInputError as exc:
                raise InvalidInputError(f"nodes[{i}] (id {node.node_id}): {exc}") from exc
        elif isinstance(node, str):
            text = node
        else:
            raise InvalidInputError(f"nodes[{i}] is a {type(node).__name__}; pass nodes, NodeWithScore or strings")
        if text.strip():
            out.append(NodeDocument(text.strip(), handle))
    return out


def call_blocks(calls: Sequence[ParsedToolCall]) -> list[ToolCallBlock]:
    """The engine's parsed calls as LlamaIndex `ToolCallBlock`s."""
    return [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=dict(c.arguments)) for c in calls]
