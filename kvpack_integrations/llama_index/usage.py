"""`record_usage()`: the kvpack usage report of every LLM call, collected through LlamaIndex instrumentation.

A query engine's `Response` does not carry the LLM's usage, and a stock synthesizer streams only
tokens. Every `KVPackLLM` call puts its report (tokens cached and prefilled, TTFT, strategy, exact,
notes) in `ChatResponse.raw["kvpack"]`, and LlamaIndex emits an `LLMChatEndEvent` with that response
at the end of every call (streamed ones included), so an event handler sees them all, whichever
synthesizer, agent or query engine made the call.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import llama_index.core.instrumentation as instrument
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent


class KVPackUsageRecorder(BaseEventHandler):
    """Appends `raw["kvpack"]` of every finished LLM call to `reports` (calls of other LLMs are skipped)."""

    reports: list[dict[str, Any]] = Field(default_factory=list)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def class_name(cls) -> str:
        return "KVPackUsageRecorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if not isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)) or event.response is None:
            return
        raw = event.response.raw
        report = raw.get("kvpack") if isinstance(raw, dict) else None
        if isinstance(report, dict):
            with self._lock:
                self.reports.append(report)


@contextmanager
def record_usage() -> Iterator[KVPackUsageRecorder]:
    """Collect the usage reports of every `KVPackLLM` call that ends while the `with` block is open.

    It listens on LlamaIndex's root dispatcher, so calls from other threads in that time count too.
    """
    recorder = KVPackUsageRecorder()
    root = instrument.get_dispatcher()
    root.add_event_handler(recorder)
    try:
        yield recorder
    finally:
        root.event_handlers = [h for h in root.event_handlers if h is not recorder]
