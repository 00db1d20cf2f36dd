"""An engine whose decoding replays a fixed reply: the paths after decoding (call parsing, finish
reasons, what LangChain receives) tested on exactly the text a model could write."""

from __future__ import annotations

from collections.abc import Iterator

from kvpack_integrations.engine.engine import Engine, Prefilled
from kvpack_integrations.engine.settings import GenerationSettings
from kvpack_integrations.engine.usage import StreamChunk


class ScriptedEngine(Engine):
    """`decode` yields `reply`'s tokens one by one, cut at `max_new_tokens` (finish "length")."""

    reply = ""

    def decode(self, state: Prefilled, settings: GenerationSettings) -> Iterator[StreamChunk]:
        tokenizer = self.loaded.tokenizer
        ids = tokenizer.encode(self.reply, add_special_tokens=False)
        finish = "stop"
        if len(ids) > settings.max_new_tokens:
            ids, finish = ids[: settings.max_new_tokens], "length"
        said = ""
        for i, token in enumerate(ids):
            text = tokenizer.decode(ids[: i + 1])
            state.usage.output_tokens += 1
            yield StreamChunk(text=text[len(said) :], token_id=token)
            said = text
        yield StreamChunk(text="", usage=state.usage, finish_reason=finish)

    def tokens_until(self, end: str) -> int:
        """How many of the reply's tokens it takes to write through `end` (a budget that cuts just after it)."""
        tokenizer = self.loaded.tokenizer
        ids = tokenizer.encode(self.reply, add_special_tokens=False)
        return next(n for n in range(1, len(ids) + 1) if end in tokenizer.decode(ids[:n]))
