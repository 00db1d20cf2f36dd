"""How a chat template writes an assistant's tool call, learned by rendering one.

Why: a call the engine writes under `tool_choice` must be the text the template renders for it at
the next step. Otherwise the model picks values after markup it was never trained on, and the next
step's prompt no longer starts with this step's tokens (no prefix reuse). Llama 3.1 writes
`{"name": ..., "parameters": ...}`, Mistral `[TOOL_CALLS] [{"name": ..., "arguments": ..., "id": ...}]`,
Qwen the Hermes `<tool_call>` block. Templates whose rendering does not fit the pattern get the Hermes
block, which is also what the fallback tools convention renders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .templates import PROBE_ARGUMENTS, PROBE_ID, PROBE_NAME, PROBE_USER, probe_turn, render_probe
from .tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

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
    head = render_probe(tokenizer, [PROBE_USER], tools, thinking, generation_prompt=True)
    called = render_probe(tokenizer, [PROBE_USER, probe_turn("")], tools, thinking)
    plain = render_probe(tokenizer, [PROBE_USER, {"role": "assistant", "content": _PLAIN}], tools, thinking)
    if head is None or called is None or plain is None:
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
    if keys[:1] != ["name"] or obj["name"] != PROBE_NAME or len(keys) < 2 or keys[1] not in ("arguments", "parameters"):
        return HERMES
    if obj[keys[1]] != PROBE_ARGUMENTS or keys[2:] not in ([], ["id"]) or obj.get("id", PROBE_ID) != PROBE_ID:
        return HERMES
    if json.dumps(obj, ensure_ascii=False) != part[start:end]:  # other separators than the decoder writes
        return HERMES
    return CallFormat(part[:start], keys[1], keys[2:] == ["id"], part[end : len(part) - len(end_of_turn)])
