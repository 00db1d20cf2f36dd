"""One rendering for a whole chat request: knowledge first, tools, tool turns, and step-to-step prefixes."""

from __future__ import annotations

import pytest

from kvpack_integrations.errors import TemplateError
from kvpack_integrations.prompts import KnowledgeFormat
from kvpack_integrations.prompts.conversation import ChatTurn, ToolCallTurn, render_conversation
from kvpack_integrations.prompts.tools import template_call_id, template_supports_tools

from .conftest import FACTS, QUESTION
from .support.tiny_models import FAMILIES, make_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the knowledge base.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
    }
]
DOCS = ('Quill Energy makes the "Tessel-9" battery.', "The Aurora X2 flies for 48 minutes.")


def _agent_turns(with_result: bool) -> list[ChatTurn]:
    turns = [ChatTurn("system", "Be brief."), ChatTurn("user", QUESTION)]
    if with_result:
        call = ToolCallTurn("search", {"query": "battery"}, "call_abc")
        turns += [
            ChatTurn("assistant", "", tool_calls=(call,)),
            ChatTurn("tool", "\n\n".join(DOCS), tool_call_id="call_abc", name="search", documents=DOCS),
        ]
    return turns


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_knowledge_opens_the_prompt_and_documents_are_located(family: str) -> None:
    tok = make_tokenizer(family)
    prompt = render_conversation(tok, _agent_turns(True), knowledge=FACTS, tools=TOOLS)
    text = prompt.rendered.text
    fmt = KnowledgeFormat()
    assert fmt.system_content(FACTS) in text
    assert text.index(FACTS[0]) < text.index(QUESTION)
    assert 0 < prompt.knowledge_tokens < len(prompt.token_ids)
    assert len(prompt.document_spans) == 2
    for (start, end), doc in zip(prompt.document_spans, DOCS):
        assert 0 < start < end <= len(prompt.token_ids)
        decoded = tok.decode(prompt.token_ids[start:end])
        assert "Tessel" in decoded or "Aurora" in decoded
        assert doc.split()[1] in decoded


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"qwen3"}))
def test_next_step_extends_the_previous_prompt(family: str) -> None:
    """Each agent step's prompt starts with the previous step's whole prompt (so only new tokens prefill)."""
    tok = make_tokenizer(family)
    step1 = render_conversation(tok, _agent_turns(False), knowledge=FACTS, tools=TOOLS).token_ids
    step2 = render_conversation(tok, _agent_turns(True), knowledge=FACTS, tools=TOOLS).token_ids
    assert step2[: len(step1)] == step1


def test_qwen3_step_prefix_breaks_only_at_the_generation_prompt() -> None:
    """Qwen3 renders an empty think block in the generation prompt but not in history: a few tokens differ."""
    tok = make_tokenizer("qwen3")
    step1 = render_conversation(tok, _agent_turns(False), knowledge=FACTS, tools=TOOLS).token_ids
    step2 = render_conversation(tok, _agent_turns(True), knowledge=FACTS, tools=TOOLS).token_ids
    common = next(i for i, (a, b) in enumerate(zip(step1, step2)) if a != b)
    assert len(step1) - common <= 8


def test_fallback_tools_for_templates_without_tool_support() -> None:
    tok = make_tokenizer("gemma")
    assert not template_supports_tools(tok)
    text = render_conversation(tok, _agent_turns(True), tools=TOOLS).rendered.text
    assert "<tools>" in text and '"name": "search"' in text
    assert '<tool_call>\n{"name": "search", "arguments": {"query": "battery"}}\n</tool_call>' in text
    assert "<tool_response>" in text


def test_native_tools_for_templates_with_tool_support() -> None:
    tok = make_tokenizer("qwen2")
    assert template_supports_tools(tok)
    text = render_conversation(tok, _agent_turns(True), tools=TOOLS).rendered.text
    assert "<tools>" in text and "You can call tools" not in text  # the template's own tool block


def test_mistral_keeps_knowledge_ahead_of_the_question() -> None:
    tok = make_tokenizer("mistral")
    turns = [ChatTurn("user", "first"), ChatTurn("assistant", "ok"), ChatTurn("user", QUESTION)]
    text = render_conversation(tok, turns, knowledge=FACTS).rendered.text
    assert text.index(FACTS[0]) < text.index("first") < text.index(QUESTION)


def test_error_status_and_bad_turns() -> None:
    tok = make_tokenizer("llama")
    turns = [ChatTurn("user", "hi"), ChatTurn("tool", "boom", tool_call_id="x", is_error=True)]
    assert "Error: boom" in render_conversation(tok, turns).rendered.text
    with pytest.raises(TemplateError, match="unknown message role"):
        ChatTurn("robot", "x")
    with pytest.raises(TemplateError, match="non-system"):
        render_conversation(tok, [ChatTurn("system", "only")])
    with pytest.raises(TemplateError, match="does not occur"):
        render_conversation(tok, [ChatTurn("user", "q"), ChatTurn("tool", "abc", documents=("zzz",))])


def test_call_ids_are_mistral_shaped_and_stable() -> None:
    a = template_call_id("call_123456789abc", "search", {"q": 1}, 0)
    assert len(a) == 9 and a.isalnum()
    assert a == template_call_id("call_123456789abc", "search", {"q": 1}, 0)
    assert template_call_id("abcDEF123", "search", {}, 0) == "abcDEF123"


def test_a_role_order_the_template_forbids_is_named() -> None:
    tok = make_tokenizer("mistral")
    call = ToolCallTurn("search", {"query": "x"}, "abcdefghi")
    turns = [
        ChatTurn("user", "q"),
        ChatTurn("assistant", "", tool_calls=(call,)),
        ChatTurn("tool", "result", tool_call_id="abcdefghi"),
        ChatTurn("user", "Answer now."),
    ]
    with pytest.raises(TemplateError, match=r"refuses this order of turns \(user -> assistant -> tool -> user\)"):
        render_conversation(tok, turns, tools=TOOLS)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_text_beside_tool_calls_and_several_calls_in_one_turn(family: str) -> None:
    """Llama 3.1's and Mistral's templates render only the calls of an assistant turn that calls tools
    (its text is left out, and said so), and Llama 3.1's takes one call per turn (a turn with two is
    rendered as two turns, said so); Qwen's shows both. Each used to fail the request."""
    tok = make_tokenizer(family)
    first, second = (
        ToolCallTurn("search", {"query": "battery"}, "abcdefghi"),
        ToolCallTurn("search", {"query": "drone"}, "jklmnopqr"),
    )
    turns = [
        ChatTurn("user", QUESTION),
        ChatTurn("assistant", "Let me check.", tool_calls=(first, second)),
        ChatTurn("tool", DOCS[0], tool_call_id="abcdefghi", name="search"),
        ChatTurn("tool", DOCS[1], tool_call_id="jklmnopqr", name="search"),
    ]
    prompt = render_conversation(tok, turns, tools=TOOLS)
    text = prompt.rendered.text
    assert all(s in text for s in ('"battery"', '"drone"', "Tessel-9", DOCS[1]))  # Llama escapes quotes
    shown = "Let me check." in text
    assert shown == (family == "qwen2")
    assert any("leaves out the text" in n for n in prompt.notes) == (not shown)
    assert any("one tool call per assistant turn" in n for n in prompt.notes) == (family == "llama")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("said", ["battery", "Quill Energy makes"])
def test_text_beside_calls_that_recurs_later_is_still_placed(family: str, said: str) -> None:
    """The text beside a call may recur later (in the call's own arguments, in a tool result): whether
    the template left it out is known from the template, not from searching the rendering for it."""
    tok = make_tokenizer(family)
    call = ToolCallTurn("search", {"query": "battery"}, "abcdefghi")
    turns = [
        ChatTurn("user", QUESTION),
        ChatTurn("assistant", said, tool_calls=(call,)),
        ChatTurn("tool", DOCS[0], tool_call_id="abcdefghi", name="search"),
    ]
    prompt = render_conversation(tok, turns, tools=TOOLS)
    assert any("leaves out the text" in n for n in prompt.notes) == (family != "qwen2")
