"""LangChain messages and documents -> the engine's framework-neutral `ChatTurn`s (and back for calls).

Only translation lives here. A `ToolMessage` whose artifact holds `Document`s (a retriever tool with
`response_format="content_and_artifact"`) keeps its content as the text the model sees, and the
documents mark where their segments sit inside it; if the content is empty the documents are the
result and are joined the way `KVPackRetriever`'s tool joins them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from ..errors import InvalidInputError
from ..prompts.conversation import ChatTurn, ToolCallTurn
from ..segments.handles import HANDLE_KEY, SegmentHandle

DOCUMENT_SEPARATOR = "\n\n"
_CHAT_ROLES = {
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
}


@dataclass
class Translated:
    turns: list[ChatTurn]
    handles: list[SegmentHandle] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def join_documents(texts: Iterable[str]) -> str:
    """How a list of documents reads as one tool result (the retriever tool's content)."""
    return DOCUMENT_SEPARATOR.join(texts)


def content_text(content: Any, where: str) -> str:
    """Text of a message's content: a string, or a list of strings / text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") in ("text", "text-plain"):
                parts.append(str(block.get("text", "")))
            elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call", "reasoning", "thinking"):
                continue  # carried by message.tool_calls / not part of the visible text
            else:
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise InvalidInputError(f"{where}: content blocks of type {kind!r} are not supported (text only)")
        return "".join(parts)
    raise InvalidInputError(f"{where}: unsupported content of type {type(content).__name__}")


def handle_of(document: Document) -> SegmentHandle | None:
    raw = (document.metadata or {}).get(HANDLE_KEY)
    return SegmentHandle.from_dict(raw) if raw is not None else None


def documents_from_artifact(artifact: Any) -> list[Document]:
    """The `Document`s in a tool artifact (a Document, or a list holding some); others are ignored."""
    if isinstance(artifact, Document):
        return [artifact]
    if isinstance(artifact, (list, tuple)):
        return [d for d in artifact if isinstance(d, Document)]
    return []


def _tool_turn(message: ToolMessage, index: int, out: Translated) -> ChatTurn:
    text = content_text(message.content, f"message {index} (tool)")
    docs = documents_from_artifact(message.artifact)
    if docs and not text.strip():
        text = join_documents(d.page_content for d in docs)
    # documents are placed as the prompt will find them: in the content's order, each after the one
    # before (an artifact may list them in another order, or hold one twice)
    first_seen = {id(d): text.find(d.page_content) if d.page_content else -1 for d in docs}
    located, cursor = [], 0
    for d in sorted(docs, key=lambda d: first_seen[id(d)]):
        at = text.find(d.page_content, cursor) if first_seen[id(d)] >= 0 else -1
        if at < 0:
            out.notes.append(
                f"message {index}: an artifact document does not occur in the tool's content (or not again); "
                "the model sees the content only"
            )
            continue
        located.append(d.page_content)
        cursor = at + len(d.page_content)
        handle = handle_of(d)
        if handle is not None:
            out.handles.append(handle)
    return ChatTurn(
        "tool",
        text,
        tool_call_id=message.tool_call_id,
        name=message.name,
        is_error=message.status == "error",
        documents=tuple(located),
    )


def to_turns(messages: Sequence[BaseMessage]) -> Translated:
    """Translate a LangChain message list, collecting segment handles of documents in tool artifacts."""
    out = Translated(turns=[])
    for i, message in enumerate(messages):
        if isinstance(message, ToolMessage):
            out.turns.append(_tool_turn(message, i, out))
        elif isinstance(message, AIMessage):
            calls = tuple(ToolCallTurn(c["name"], dict(c.get("args") or {}), c.get("id")) for c in message.tool_calls)
            out.turns.append(
                ChatTurn("assistant", content_text(message.content, f"message {i} (ai)"), tool_calls=calls)
            )
        elif isinstance(message, HumanMessage):
            out.turns.append(ChatTurn("user", content_text(message.content, f"message {i} (human)")))
        elif isinstance(message, SystemMessage):
            out.turns.append(ChatTurn("system", content_text(message.content, f"message {i} (system)")))
        elif isinstance(message, FunctionMessage):
            out.turns.append(
                ChatTurn("tool", content_text(message.content, f"message {i} (function)"), name=message.name)
            )
        elif isinstance(message, ChatMessage) and message.role in _CHAT_ROLES:
            out.turns.append(ChatTurn(_CHAT_ROLES[message.role], content_text(message.content, f"message {i}")))
        else:
            raise InvalidInputError(f"message {i}: unsupported message type {type(message).__name__}")
    return out


def call_documents(documents: Any) -> tuple[list[str], list[SegmentHandle]]:
    """Per-call `documents=`: `Document`s or strings, in order; returns texts and any segment handles."""
    if documents is None:
        return [], []
    if isinstance(documents, (str, Document)):
        documents = [documents]
    if not isinstance(documents, Sequence):  # a mapping was read as its keys, a number failed raw
        kind = type(documents).__name__
        raise InvalidInputError(f"documents= takes Documents or strings (one, or a list), got {kind}")
    texts, handles = [], []
    for i, doc in enumerate(documents):
        if isinstance(doc, Document):
            text = doc.page_content
            handle = handle_of(doc)
            if handle is not None:
                handles.append(handle)
        elif isinstance(doc, str):
            text = doc
        else:
            raise InvalidInputError(f"documents[{i}] is a {type(doc).__name__}; pass Documents or strings")
        if text.strip():
            texts.append(text.strip())
    return texts, handles
