"""The plain-text twin of a `KVPackChatModel` call: the messages a text-only chat model must be sent
to see exactly the same prompt (knowledge, tool list, tool calls and results all as text).

Used by the benchmark that runs LangChain's `ChatHuggingFace` (text stuffing) side by side with
`KVPackChatModel`, and by anyone who wants to check what the model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from ..engine.chat import prepare
from ..engine.registry import shared_engine
from ..errors import InvalidInputError
from .chat_model import KVPackChatModel

_CLASSES = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}


@dataclass(frozen=True)
class TextTwin:
    messages: list[BaseMessage]
    token_ids: list[int]  # the prompt KVPackChatModel renders for the call


def text_stuffed_messages(model: KVPackChatModel, messages: LanguageModelInput, **kwargs: Any) -> TextTwin:
    """Plain system/user/assistant messages whose chat-template rendering equals this call's prompt."""
    loaded = model.loaded_model(kwargs.get("model"))
    stop = kwargs.pop("stop", None)
    request, _ = model._request(model._convert_input(messages).to_messages(), stop, kwargs, loaded, take_run=False)
    engine = shared_engine(loaded)
    with engine.lock:  # rendering may load a bound pack into the shared prefix tree
        prompt, _, _ = prepare(engine, request)
    if prompt.native_tools:
        raise InvalidInputError("this template renders tools itself; plain messages cannot carry them")
    out: list[BaseMessage] = []
    for message in prompt.template_messages:
        cls = _CLASSES.get(str(message["role"]))
        if cls is None:
            raise InvalidInputError(f"no plain-message form for role {message['role']!r}")
        out.append(cls(content=str(message["content"])))
    return TextTwin(out, prompt.token_ids)
