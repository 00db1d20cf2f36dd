"""One reading of the tool_choice spellings that LangChain, LlamaIndex and OpenAI callers use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidInputError


def normalize_tool_choice(tool_choice: Any, names: Sequence[str]) -> str:
    """`None`/"auto", `False`/"none", `True`/"any"/"required", a tool name or an OpenAI-style mapping
    -> auto | none | required | the tool name; anything else is refused, naming the tools on offer."""
    if tool_choice is None or tool_choice == "auto":
        return "auto"
    if tool_choice is False or tool_choice == "none":
        return "none"
    if tool_choice is True or tool_choice in ("any", "required"):
        if not names:
            raise InvalidInputError(f"tool_choice={tool_choice!r} forces a tool call, and no tools are given")
        return "required"
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else tool_choice.get("name")
        if isinstance(name, str):
            tool_choice = name
    if isinstance(tool_choice, str) and tool_choice in names:
        return tool_choice
    known = ", ".join(names) or "no tools are given"
    raise InvalidInputError(f"tool_choice {tool_choice!r} is not auto/none/any/required or a given tool ({known})")
