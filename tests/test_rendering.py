"""Layer 2: one chat-template call, spans on token boundaries, the template pitfalls."""

from __future__ import annotations

import pytest

from kvpack_integrations import render_messages
from kvpack_integrations.errors import TemplateError

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
