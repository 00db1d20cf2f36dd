"""Tools in the prompt: through the chat template's own `tools` support, or a documented fallback.

Templates that know tools (Llama 3.1, Qwen2.5/3, Mistral) get them through `apply_chat_template(tools=)`
and their own tool-call and tool-result turns. Templates that do not (SmolLM2's ChatML, Gemma, Phi-3)
get the Hermes convention, the most widespread one for ChatML models:

* the tool list, as JSON schemas inside `<tools></tools>`, at the end of the system message;
* calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the assistant turn;
* results as a user turn holding `<tool_response>...</tool_response>` blocks.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from .templates import PROBE_NAME, PROBE_USER, render_probe

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_CALL_ID = re.compile(r"^[A-Za-z0-9]{9}$")
_ALPHABET = string.ascii_letters + string.digits


PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": PROBE_NAME,
        "description": "kvpack probe",
        "parameters": {"type": "object", "properties": {"kvpackarg": {"type": "integer"}}},
    },
}


def template_supports_tools(tokenizer: Any) -> bool:
    """True when the chat template renders the `tools` it is given (so it shows tool schemas itself),
    learned by rendering a probe tool once per template: the word `tools` in a template does not say
    so (Phi-4-mini's reads `message['tools']` and drops the `tools=` argument)."""
    text = render_probe(tokenizer, [PROBE_USER], [PROBE_TOOL], None)
    return text is not None and PROBE_NAME in text


def format_tool_call_block(name: str, arguments: Mapping[str, Any]) -> str:
    """The canonical fallback call: what a forced call emits and how past calls are rendered."""
    payload = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{payload}\n{TOOL_CALL_CLOSE}"


def fallback_tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tool list and calling convention appended to the system message (fallback templates)."""
    schemas = "\n".join(json.dumps(dict(t), ensure_ascii=False) for t in tools)
    return (
        "You can call tools. Their signatures are inside <tools></tools>:\n"
        f"<tools>\n{schemas}\n</tools>\n"
        "To call a tool, reply with only a JSON object with the tool name and arguments inside "
        f'{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} tags:\n{TOOL_CALL_OPEN}\n{{"name": <tool-name>, "arguments": '
        f"<args-json-object>}}\n{TOOL_CALL_CLOSE}\n"
        "Tool results come back inside <tool_response></tool_response> tags."
    )


def fallback_tool_response(content: str, is_error: bool) -> str:
    """One tool result as the fallback renders it inside a user turn."""
    body = f"Error: {content}" if is_error else content
    return f"<tool_response>\n{body}\n</tool_response>"


def template_call_id(call_id: str | None, name: str, arguments: Mapping[str, Any], position: int) -> str:
    """A 9-alphanumeric call id (Mistral's templates refuse anything else), stable for a given call.

    Ids already in that form pass through; others are mapped deterministically, so the same history
    renders to the same tokens at every step (prefix reuse depends on it).
    """
    if call_id and _CALL_ID.match(call_id):
        return call_id
    seed = f"{call_id}|{name}|{json.dumps(dict(arguments), sort_keys=True)}|{position}".encode()
    digest = hashlib.blake2b(seed, digest_size=16).digest()
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[:9])
