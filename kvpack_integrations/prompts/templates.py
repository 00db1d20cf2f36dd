"""Calling a chat template: the keyword arguments we pass, and probe renderings that teach us what a
template does with a tool call (its call format, whether it keeps the text beside a call).

Why probes: templates differ in ways no metadata states, and searching a real rendering for the answer
is fooled when the same text occurs twice. A probe conversation of made-up names renders once per
template and is cached.
"""

from __future__ import annotations

import functools
import json
from typing import Any

PROBE_NAME, PROBE_ARGUMENTS, PROBE_ID = "kvpackprobe", {"kvpackarg": 7}, "kvpackid0"
PROBE_USER = {"role": "user", "content": "u"}


def template_kwargs(tokenizer: Any, thinking: bool | None) -> dict[str, Any]:
    """`enable_thinking` for the templates that read it (Qwen3); nothing for the others."""
    template = tokenizer.chat_template or ""
    if thinking is not None and "enable_thinking" in str(template):
        return {"enable_thinking": thinking}
    return {}


def probe_turn(content: str) -> dict[str, Any]:
    """An assistant turn calling the probe tool once, with `content` beside the call."""
    call = {"id": PROBE_ID, "type": "function", "function": {"name": PROBE_NAME, "arguments": dict(PROBE_ARGUMENTS)}}
    return {"role": "assistant", "content": content, "tool_calls": [call]}


def render_probe(
    tokenizer: Any, messages: list[dict[str, Any]], tools: Any, thinking: bool | None, generation_prompt: bool = False
) -> str | None:
    """The template's rendering of a probe conversation, or None where it cannot render it."""
    return _render(
        str(tokenizer.chat_template or ""),
        tokenizer,
        json.dumps(messages),  # keys in their order: templates render dicts as given (Mistral's calls)
        json.dumps(tools or None),
        thinking,
        generation_prompt,
    )


@functools.lru_cache(maxsize=128)
def _render(
    template: str, tokenizer: Any, messages_json: str, tools_json: str, thinking: bool | None, generation_prompt: bool
) -> str | None:
    kwargs = {**template_kwargs(tokenizer, thinking), "tools": json.loads(tools_json)}
    try:
        text = tokenizer.apply_chat_template(
            json.loads(messages_json), tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )
    except Exception:  # a template that cannot render the probe: the caller's fallback
        return None
    return text if isinstance(text, str) else None


_SYSTEM_PROBE = "kvpack-system-probe"


def system_stays_first(tokenizer: Any) -> bool:
    """Whether the template keeps the system text ahead of the first user turn (Mistral's moves it into the
    last one). A template that cannot render a system message at all counts as keeping it: such templates
    get the system text folded into the first user turn anyway (`rendering.fold_system`)."""
    probe = [
        {"role": "system", "content": _SYSTEM_PROBE},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    text = render_probe(tokenizer, probe, None, None, generation_prompt=True)
    if text is None:
        return True
    pos = text.find(_SYSTEM_PROBE)
    return 0 <= pos < text.find("u1")
