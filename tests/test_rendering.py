"""Layer 2: one chat-template call, spans on token boundaries, the template pitfalls."""

from __future__ import annotations

import copy

import pytest

from kvpack_integrations import knowledge_prompt, render_messages
from kvpack_integrations.errors import TemplateError
from kvpack_integrations.prompts import KnowledgeFormat
from kvpack_integrations.prompts.conversation import ChatTurn, render_conversation
from kvpack_integrations.prompts.tools import template_supports_tools

from .conftest import FACTS, QUESTION
from .support.tiny_models import FAMILIES, make_tokenizer

MESSAGES = [
    {"role": "system", "content": "Knowledge: the sky is teal."},
    {"role": "user", "content": "What colour is the sky?"},
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_rendering_matches_apply_chat_template(family: str) -> None:
    tok = make_tokenizer(family)
    rendered = render_messages(tok, MESSAGES, thinking=None)
    expected = tok.apply_chat_template(
        MESSAGES
        if family != "gemma"
        else [{"role": "user", "content": "Knowledge: the sky is teal.\n\nWhat colour is the sky?"}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    assert list(rendered.token_ids) == list(expected)
    for span, msg in zip(rendered.parts, MESSAGES):
        start, end = span.chars
        assert rendered.text[start:end] == msg["content"]
        a, b = span.tokens
        decoded = tok.decode(rendered.token_ids[a:b])
        assert msg["content"].split()[-1].rstrip("?.") in decoded


def test_gemma_folds_system_into_first_user_turn() -> None:
    tok = make_tokenizer("gemma")
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template(MESSAGES, tokenize=False)
    rendered = render_messages(tok, MESSAGES)
    assert rendered.system_folded
    sys_span, user_span = rendered.parts
    assert sys_span.chars[1] < user_span.chars[0]
    assert rendered.text.count("<start_of_turn>user") == 1


def test_llama_preamble_and_split_rendering_pitfall() -> None:
    """Rendering the system part and the user part in two calls is not the single rendering."""
    tok = make_tokenizer("llama")
    whole = render_messages(tok, MESSAGES)
    assert "Cutting Knowledge Date" in whole.text
    assert whole.text.count("<|begin_of_text|>") == 1
    sys_only = tok.apply_chat_template(MESSAGES[:1], tokenize=False)
    user_only = tok.apply_chat_template(MESSAGES[1:], tokenize=False, add_generation_prompt=True)
    split = sys_only + user_only
    assert split != whole.text
    assert split.count("<|begin_of_text|>") == 2  # duplicated BOS ...
    assert split.count("Cutting Knowledge Date") == 2  # ... and a second system header with the preamble


def test_default_system_prompt_injection_is_part_of_the_prefix() -> None:
    tok = make_tokenizer("qwen2")
    without = render_messages(tok, MESSAGES[1:])
    assert "You are Qwen" in without.text  # the template injects its default system prompt
    with_knowledge = render_messages(tok, MESSAGES)
    assert "You are Qwen" not in with_knowledge.text
    # both start with the system header; from there the injected prompt and the knowledge part ways,
    # so a cache built without a system message can never serve a knowledge prompt
    common = next(i for i, (a, b) in enumerate(zip(without.token_ids, with_knowledge.token_ids)) if a != b)
    assert tok.decode(with_knowledge.token_ids[:common]) == "<|im_start|>system\n"


def test_qwen3_thinking_is_off_by_default() -> None:
    tok = make_tokenizer("qwen3")
    off = render_messages(tok, MESSAGES)
    on = render_messages(tok, MESSAGES, thinking=True)
    assert off.text.endswith("<think>\n\n</think>\n\n")
    assert not on.text.endswith("</think>\n\n")


def test_tokens_before_is_a_token_boundary_of_the_single_rendering() -> None:
    tok = make_tokenizer("qwen2")
    rendered = render_messages(tok, MESSAGES)
    cut = rendered.tokens_before(rendered.part(1).chars[0])
    prefix_text = tok.decode(rendered.token_ids[:cut])
    assert prefix_text.endswith("user\n")
    assert rendered.text.startswith(prefix_text)


def test_bad_messages_get_clear_errors() -> None:
    tok = make_tokenizer("qwen2")
    with pytest.raises(TemplateError, match="role"):
        render_messages(tok, [{"content": "x"}])
    with pytest.raises(TemplateError, match="content"):
        render_messages(tok, [{"role": "user", "content": None}])
    for bad, why in [
        ({"role": "user", "content": "hi"}, "must be a list"),
        ("hi", "must be a list"),
        ([], "no messages"),
        ([("user", "hi")], "message 0 is a tuple"),
    ]:
        with pytest.raises(TemplateError, match=why):
            render_messages(tok, bad)  # type: ignore[arg-type]


# Mistral-7B-Instruct-v0.1 / Mixtral-8x7B-Instruct-v0.1: no system role, refused as "roles must alternate"
ALTERNATING_ONLY = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def _with_template(family: str, template: str):  # type: ignore[no-untyped-def]
    tok = copy.deepcopy(make_tokenizer(family))
    tok.chat_template = template
    return tok


def test_a_template_without_a_system_role_gets_it_folded_whatever_its_error_says() -> None:
    tok = _with_template("mistral", ALTERNATING_ONLY)
    rendered = render_messages(tok, MESSAGES)
    assert rendered.system_folded
    folded = [{"role": "user", "content": "Knowledge: the sky is teal.\n\nWhat colour is the sky?"}]
    assert rendered.text == tok.apply_chat_template(folded, tokenize=False)
    prompt = knowledge_prompt(tok, FACTS, QUESTION, KnowledgeFormat())
    assert FACTS[0] in tok.decode(prompt.token_ids[prompt.knowledge_cuts[0] : prompt.knowledge_cuts[1]])
    conversation = render_conversation(tok, [ChatTurn("user", QUESTION)], knowledge=FACTS)
    assert conversation.token_ids == prompt.token_ids


def test_a_template_moving_the_system_text_keeps_it_first_over_several_turns() -> None:
    """Mistral v0.3 puts the system text into the last user turn: a one-turn prompt is rendered as the
    template renders it; with earlier turns (knowledge_prompt's history) the knowledge is kept ahead of them."""
    tok = make_tokenizer("mistral")
    one = knowledge_prompt(tok, FACTS, QUESTION, KnowledgeFormat())
    system = KnowledgeFormat().system_content(FACTS)
    expected = tok.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    assert one.token_ids == list(expected)
    history = [("Who makes the battery?", "Quill Energy.")]
    more = knowledge_prompt(tok, FACTS, QUESTION, KnowledgeFormat(), history=history)
    assert more.token_ids[: one.knowledge_cuts[-2]] == one.token_ids[: one.knowledge_cuts[-2]]  # same pack prefix
    text = tok.decode(more.token_ids)
    assert text.index(FACTS[-1]) < text.index(history[0][0]) < text.index(QUESTION)
    turns = [ChatTurn("system", "Be brief."), ChatTurn("user", "first"), ChatTurn("assistant", "ok")]
    notes = render_conversation(tok, [*turns, ChatTurn("user", QUESTION)], knowledge=FACTS).notes
    assert any("moves the system message into the last user turn" in n for n in notes)


def test_earlier_turns_whose_thinking_the_template_drops_are_rendered() -> None:
    """Qwen3 drops `<think>...</think>` from assistant turns before the last question: the turn is located
    by its visible answer, and the rendering is the template's own."""
    tok = make_tokenizer("qwen3")
    msgs = [
        {"role": "user", "content": "Which company makes the battery?"},
        {"role": "assistant", "content": "<think>\nThe facts say Quill.\n</think>\n\nQuill Energy."},
        {"role": "user", "content": "Where is it based?"},
    ]
    for thinking in (True, False):
        rendered = render_messages(tok, msgs, thinking=thinking)
        expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        assert rendered.text == expected
        start, end = rendered.part(1).chars
        assert rendered.text[start:end] == "Quill Energy."
    turns = [ChatTurn(m["role"], m["content"]) for m in msgs]
    assert "Quill Energy." in render_conversation(tok, turns, thinking=True).rendered.text


PHI4_MINI = (  # microsoft/Phi-4-mini-instruct: reads message['tools'], ignores the tools= argument
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_tool_support_is_learned_by_rendering_a_tool_not_by_the_word_tools() -> None:
    tok = _with_template("phi3", PHI4_MINI)
    assert not template_supports_tools(tok)
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    prompt = render_conversation(tok, [ChatTurn("user", QUESTION)], tools=tools)
    assert not prompt.native_tools and '"name": "search"' in prompt.rendered.text
    assert template_supports_tools(make_tokenizer("qwen2")) and template_supports_tools(make_tokenizer("llama"))
