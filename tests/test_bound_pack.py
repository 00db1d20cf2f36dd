"""A pack bound to chat requests: kept resident by the tokens it holds, and a prompt it is not a prefix
of (tools ahead of the knowledge, another day's date) reuses what it can and says why."""

from __future__ import annotations

import copy
import datetime as real_datetime
from pathlib import Path

import pytest

from kvpack_integrations import Engine, build_pack
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.engine.chat import ChatRequest, chat
from kvpack_integrations.engine.settings import GenerationSettings
from kvpack_integrations.knowledge.bound import BoundPack
from kvpack_integrations.prompts.conversation import ChatTurn
from kvpack_integrations.runtime.loader import wrap_model
from kvpack_integrations.segments import PackStore

from .conftest import FACTS, QUESTION
from .support.tiny_models import make_model

SETTINGS = GenerationSettings(max_new_tokens=3)
TOOLS = [
    {
        "type": "function",
        "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
    }
]


def _ask(engine: Engine, bound: BoundPack, **kwargs):  # type: ignore[no-untyped-def]
    return chat(engine, ChatRequest(turns=[ChatTurn("user", QUESTION)], pack=bound, settings=SETTINGS, **kwargs))


def test_a_pack_behind_tool_definitions_says_how_much_of_it_was_reused(tmp_path: Path) -> None:
    """Llama 3.1 renders tools into the system header, ahead of the knowledge: the pack is not a prefix."""
    loaded = make_model("llama")
    store = PackStore(tmp_path)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)
    engine, bound = Engine(loaded), BoundPack.open(str(tmp_path), "kb")
    plain = _ask(engine, bound).usage
    assert not any("is not a prefix" in n for n in plain.notes)
    with_tools = _ask(engine, bound, tools=TOOLS, tool_choice="none").usage
    note = next(n for n in with_tools.notes if "is not a prefix of this prompt" in n)
    assert with_tools.exact and with_tools.cached_tokens < plain.cached_tokens
    assert f"only its first {with_tools.cached_tokens} tokens were reused" in note


class _Clock(real_datetime.datetime):
    day = 1

    @classmethod
    def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
        return real_datetime.datetime(2026, 12, cls.day, 9, 0)


def test_a_pack_under_a_date_printing_template_is_loaded_once_and_reused_up_to_the_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.utils import chat_template_utils

    monkeypatch.setattr(chat_template_utils, "datetime", _Clock)
    base = make_model("llama")
    tokenizer = copy.deepcopy(base.tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace('"26 Jul 2024"', 'strftime_now("%d %b %Y")')
    loaded = wrap_model(base.model, tokenizer, name="tiny-llama-dated")
    store = PackStore(tmp_path)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)  # on the 1st
    _Clock.day = 2
    try:
        engine, bound = Engine(loaded, max_cached_tokens=10_000), BoundPack.open(str(tmp_path), "kb")
        first, second = _ask(engine, bound, remember=False).usage, _ask(engine, bound, remember=False).usage
    finally:
        _Clock.day = 1
    assert any("loaded from" in n for n in first.notes)
    assert not any("loaded from" in n for n in second.notes)  # resident: not read from the store again
    for usage in (first, second):
        assert usage.exact and usage.cached_tokens > 0
        assert any("is not a prefix of this prompt" in n for n in usage.notes)
