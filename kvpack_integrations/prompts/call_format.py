"""How a chat template writes an assistant's tool call, learned by rendering one.

Why: a call the engine writes under `tool_choice` must be the text the template renders for it at
the next step. Otherwise the model picks values after markup it was never trained on, and the next
step's prompt no longer starts with this step's tokens (no prefix reuse). Llama 3.1 writes
`{"name": ..., "parameters": ...}`, Mistral `[TOOL_CALLS] [{"name": ..., "arguments": ..., "id": ...}]`,
Qwen the Hermes `<tool_call>` block. Templates whose rendering does not fit the pattern get the Hermes
block, which is also what the fallback tools convention renders.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from .rendering import template_kwargs
from .tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_NAME, _ARGS, _ID = "kvpackprobe", {"kvpackarg": 7}, "kvpackid0"
_PLAIN = "kvpackplain"


@dataclass(frozen=True)
class CallFormat:
    """One call as `prefix + {"name": N, "<arguments_key>": A[, "id": I]} + suffix` (JSON with `, ` and
    `: ` separators), up to the end-of-turn marker the model writes itself."""

    prefix: str
    arguments_key: str
    with_id: bool
    suffix: str

    def opening(self) -> str:
        return self.prefix + '{"name": '

    def between(self) -> str:
        return f', "{self.arguments_key}": '

    def closing(self, call_id: str) -> str:
        return (f', "id": {json.dumps(call_id)}' if self.with_id else "") + "}" + self.suffix


HERMES = CallFormat(f"{TOOL_CALL_OPEN}\n", "arguments", False, f"\n{TOOL_CALL_CLOSE}")


def native_call_format(tokenizer: Any, tools: Any, thinking: bool | None = False) -> CallFormat:
    """The template's own call format (for templates that render tools natively), else `HERMES`."""
    return _probe(str(tokenizer.chat_template or ""), tokenizer, json.dumps(tools, sort_keys=True), thinking)


@functools.lru_cache(maxsize=32)
def _probe(template: str, tokenizer: Any, tools_json: str, thinking: bool | None) -> CallFormat:
    tools = json.loads(tools_json)
    kwargs = {**template_kwargs(tokenizer, thinking), "tools": tools}
    call = {"id": _ID, "type": "function", "function": {"name": _NAME, "arguments": dict(_ARGS)}}
    user = {"role": "user", "content": "u"}
    try:
        head = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True, **kwargs)
        called = tokenizer.apply_chat_template(
            [user, {"role": "assistant", "content": "", "tool_calls": [call]}], tokenize=False, **kwargs
        )
        plain = tokenizer.apply_chat_template(
            [user, {"role": "assistant", "content": _PLAIN}], tokenize=False, **kwargs
        )
    except Exception:  # a template that cannot render the probe: the Hermes block
        return HERMES
    if not called.startswith(head) or not plain.startswith(head) or _PLAIN not in plain[len(head) :]:
        return HERMES
    part = called[len(head) :]
    end_of_turn = plain[len(head) :].split(_PLAIN, 1)[1]
    start = part.find('{"name": ')
    if start < 0 or not part.endswith(end_of_turn):
        return HERMES
    try:
        obj, end = json.JSONDecoder().raw_decode(part, start)
    except ValueError:
        return HERMES
    keys = list(obj) if isinstance(obj, dict) else []
    if keys[:1] != ["name"] or obj["name"] != _NAME or len(keys) < 2 or keys[1] not in ("arguments", "parameters"):
        return HERMES
    if obj[keys[1]] != _ARGS or keys[2:] not in ([], ["id"]) or obj.get("id", _ID) != _ID:
        return HERMES
    if json.dumps(obj, ensure_ascii=False) != part[start:end]:  # other separators than the decoder writes
        return HERMES
    return CallFormat(part[:start], keys[1], keys[2:] == ["id"], part[end : len(part) - len(end_of_turn)])
