"""Layer 2: prompt rendering with token spans from a single chat-template call."""

from .knowledge import DEFAULT_INSTRUCTION, KnowledgeFormat
from .rendering import Message, PartSpan, RenderedPrompt, render_messages

__all__ = ["DEFAULT_INSTRUCTION", "KnowledgeFormat", "Message", "PartSpan", "RenderedPrompt", "render_messages"]
