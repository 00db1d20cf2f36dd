"""Finding tool calls in free text: every format small models write, repair, coercion and problems."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kvpack_integrations.engine.tool_calls import (
    ParsedToolCall,
    format_tool_call,
    new_call_id,
    parse_tool_calls,
    repair_json,
)
from kvpack_integrations.errors import InvalidInputError

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "metric": {"type": "boolean"},
        "ratio": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "when": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    },
    "required": ["city"],
}
TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": WEATHER,
    "noop": {"type": "object", "properties": {}},
    "strict": {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
}


def calls_of(text: str, tools: Any = TOOLS) -> tuple[str, list[tuple[str, dict[str, Any]]], list[str]]:
    content, calls, problems = parse_tool_calls(text, tools)
    return content, [(c.name, c.arguments) for c in calls], problems


PARIS = [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',  # unterminated at the end
        '<tool_call>\n```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\n</tool_call>',
        '<tool_call>{"name": "get_weather", "parameters": {"city": "Paris"}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>',
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '  [{"name": "get_weather", "arguments": {"city": "Paris"}}]\n',
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}]',
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        '<function=get_weather>{"city": "Paris"}</function>',
        '{"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}',
        'get_weather(city="Paris")',
        "get_weather('Paris')",
        '<|python_tag|>get_weather.call(city="Paris")',
    ],
)
def test_every_format_gives_the_same_call(text: str) -> None:
    assert calls_of(text) == ("", PARIS, [])


def test_several_calls_and_the_prose_around_them() -> None:
    text = (
        "Let me look that up.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'
    )
    assert calls_of(text) == ("Let me look that up.", [*PARIS, ("noop", {})], [])
    two_in_one = '<tool_call>\n{"name": "noop"}\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert calls_of(two_in_one)[1] == [("noop", {}), *PARIS]
    listed = '[TOOL_CALLS][{"name": "noop", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Paris"}}]'
    assert calls_of(listed)[1] == [("noop", {}), *PARIS]
    assert calls_of('[get_weather(city="Paris"), noop()]')[1] == [*PARIS, ("noop", {})]
    fenced = 'Checking.\n```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\nOne moment.'
    assert calls_of(fenced) == ("Checking.\n\nOne moment.", PARIS, [])
    trailing = '{"name": "get_weather", "arguments": {"city": "Paris"}} I will report back.'
    assert calls_of(trailing) == ("I will report back.", PARIS, [])


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "arguments": {"city": "Paris",},}',  # trailing commas
        "{'name': 'get_weather', 'arguments': {'city': 'Paris'}}",  # single quotes
        '{"name": "get_weather", "arguments": {"city": "Paris"}}}}',  # unbalanced closers at the end
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"',  # cut off mid-object
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": None}}',  # Python None
        '{name: "get_weather", arguments: {city: "Paris"}}',  # bare keys
    ],
)
def test_broken_json_is_repaired(text: str) -> None:
    content, calls, problems = calls_of(text)
    assert (content, problems) == ("", [])
    assert calls[0][0] == "get_weather" and calls[0][1]["city"] == "Paris"


def test_repair_json_directly() -> None:
    assert json.loads(repair_json("{'a': 'it\\'s \"x\"', 'b': [1, 2,], 'c': True}")) == {
        "a": 'it\'s "x"',
        "b": [1, 2],
        "c": True,
    }
    assert json.loads(repair_json('{"a": [1, {"b": "c')) == {"a": [1, {"b": "c"}]}
    assert json.loads(repair_json('{"a": 1, "b": ')) == {"a": 1, "b": None}
    assert json.loads(repair_json("]{}}")) == {}


def test_arguments_are_coerced_to_the_schema() -> None:
    text = json.dumps(
        {
            "name": "get_weather",
            "arguments": {
                "city": 75000,
                "days": "3",
                "metric": "true",
                "ratio": "0.5",
                "tags": "sunny",
                "unit": "Celsius",
                "when": "12",
                "other": "kept",
            },
        }
    )
    _, calls, problems = calls_of(text)
    assert problems == []
    assert calls == [
        (
            "get_weather",
            {
                "city": "75000",
                "days": 3,
                "metric": True,
                "ratio": 0.5,
                "tags": ["sunny"],
                "unit": "celsius",
                "when": 12,
                "other": "kept",
            },
        )
    ]
    assert calls_of('{"name": "get_weather", "arguments": {"city": "x", "days": 2.0, "metric": "no"}}')[1] == [
        ("get_weather", {"city": "x", "days": 2, "metric": False})
    ]
    # unconvertible values stay as written (the tool's own validation reports them)
    assert calls_of('{"name": "get_weather", "arguments": {"city": "x", "days": "soon"}}')[1][0][1]["days"] == "soon"


def test_unknown_keys_are_dropped_only_when_the_schema_forbids_them() -> None:
    assert calls_of('{"name": "strict", "arguments": {"a": "1", "b": 2}}')[1] == [("strict", {"a": 1})]
    assert calls_of('{"name": "noop", "arguments": {"b": 2}}')[1] == [("noop", {"b": 2})]


def test_unknown_tool_is_a_problem_not_a_call() -> None:
    content, calls, problems = calls_of('<tool_call>{"name": "launch", "arguments": {}}</tool_call>')
    assert (content, calls) == ("", [])
    assert len(problems) == 1 and "'launch'" in problems[0] and "get_weather" in problems[0]
    assert calls_of("launch(x=1)") == ("launch(x=1)", [], [])  # Python style needs a known name


def test_missing_required_argument_is_a_problem() -> None:
    content, calls, problems = calls_of('<tool_call>{"name": "get_weather", "arguments": {"days": 2}}</tool_call>')
    assert (content, calls) == ("", [])
    assert len(problems) == 1 and "'city'" in problems[0] and "get_weather" in problems[0]


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>this is not json</tool_call>",
        '<tool_call>{"tool": "get_weather"}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": [1, 2]}</tool_call>',
        "[TOOL_CALLS] nonsense",
    ],
)
def test_marked_but_unusable_calls_are_problems(text: str) -> None:
    content, calls, problems = calls_of(text)
    assert (content, calls) == ("", []) and len(problems) == 1


@pytest.mark.parametrize(
    "text",
    [
        "The weather in Paris is sunny.",
        'Here is the data: {"temp": 3}',
        '{"temp": 3, "name": "x"}',
        '{"name": "Alice"}',  # an answer in JSON, not a call to a tool named Alice
        '[{"name": "Alice", "id": "a1"}, {"name": "Bob", "id": "b2"}]',
        'print("hello")',
        "get_weather is a tool I could call.",
        "",
    ],
)
def test_plain_replies_have_no_calls(text: str) -> None:
    assert calls_of(text) == (text.strip(), [], [])


def test_without_tools_any_name_counts_and_arguments_stay_as_written() -> None:
    assert calls_of('{"name": "anything", "arguments": {"x": "1"}}', None)[1] == [("anything", {"x": "1"})]
    assert calls_of("anything(x=1)", None) == ("anything(x=1)", [], [])
    assert calls_of('{"name": "anything", "arguments": {}}', {})[2]  # an empty tool list knows no names


@pytest.mark.parametrize(
    ("name", "arguments"),
    [
        ("noop", {}),
        ("get_weather", {"city": "Zürich", "days": 3}),
        ("get_weather", {"city": 'say "hi"\n', "tags": ["a", "b"], "when": None}),
    ],
)
@pytest.mark.parametrize("tools", [TOOLS, None])
def test_format_tool_call_round_trips(name: str, arguments: dict[str, Any], tools: Any) -> None:
    block = format_tool_call(name, arguments)
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    assert block == f"<tool_call>\n{payload}\n</tool_call>"
    assert calls_of(block, tools) == ("", [(name, arguments)], [])


def test_call_ids_are_nine_distinct_alphanumerics() -> None:
    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)
    _, calls, _ = parse_tool_calls('[{"name": "noop"}, {"name": "noop"}]', TOOLS)
    assert len(calls) == 2 and calls[0].id != calls[1].id
    assert all(isinstance(c, ParsedToolCall) and re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in calls)


def test_tool_choice_spellings_and_refusals() -> None:
    from kvpack_integrations.engine.tool_choice import normalize_tool_choice
    from kvpack_integrations.errors import InvalidInputError

    names = ["search", "add"]
    assert [normalize_tool_choice(c, names) for c in (None, "auto", False, "none", True, "any", "required")] == [
        "auto",
        "auto",
        "none",
        "none",
        "required",
        "required",
        "required",
    ]
    assert normalize_tool_choice({"type": "function", "function": {"name": "add"}}, names) == "add"
    assert normalize_tool_choice({"name": "search"}, names) == "search"
    for bad in ("lookup", {"function": "search"}, {"function": {"name": "lookup"}}, 3):
        with pytest.raises(InvalidInputError, match="not auto/none/any/required or a given tool"):
            normalize_tool_choice(bad, names)
    with pytest.raises(InvalidInputError, match="no tools are given"):
        normalize_tool_choice("search", [])
    for forced in (True, "any", "required"):  # named where the choice is made (bind_tools), not at a call
        with pytest.raises(InvalidInputError, match="forces a tool call, and no tools are given"):
            normalize_tool_choice(forced, [])


@pytest.mark.parametrize(
    ("family", "reply"),
    [
        ("llama", 'Let me check.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}'),
        ("mistral", 'Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]'),
        (
            "qwen2",
            'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
            "\n</tool_call>",
        ),
    ],
)
def test_call_markers_that_are_special_tokens_survive_decoding(family: str, reply: str) -> None:
    """The engine's text drops special tokens, and some templates' call markers are special tokens: calls
    after prose must still be found (they were read as prose and stray JSON)."""
    from kvpack_integrations.engine.tool_calls import call_text

    from .support.tiny_models import make_tokenizer

    tokenizer = make_tokenizer(family)
    ids = tokenizer.encode(reply, add_special_tokens=False)
    text = tokenizer.decode(ids, skip_special_tokens=True)  # what the engine's text stream gives
    content, calls, problems = parse_tool_calls(call_text(tokenizer, ids, text), TOOLS)
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris", "days": 2})], text
    assert content == "Let me check." and problems == []
    # a stop sequence cut the text after the call: the call is still found, the rest still cut
    stopped = reply + "\n\nObservation: sunny"
    ids = tokenizer.encode(stopped, add_special_tokens=False)
    text = tokenizer.decode(ids, skip_special_tokens=True).split("\n\nObservation")[0]
    content, calls, _ = parse_tool_calls(call_text(tokenizer, ids, text), TOOLS)
    assert len(calls) == 1 and content == "Let me check."
    plain = tokenizer.encode("No call here.</s>", add_special_tokens=False)
    assert call_text(tokenizer, plain, "No call here.") == "No call here."  # other special tokens stay dropped


def test_enum_members_that_are_not_strings_are_coerced_from_strings() -> None:
    tools = {"pick": {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}, "on": {"enum": [True]}}}}
    _, calls, problems = parse_tool_calls('{"name": "pick", "arguments": {"n": "2", "on": "true"}}', tools)
    assert problems == [] and calls[0].arguments == {"n": 2, "on": True}
    _, calls, _ = parse_tool_calls('{"name": "pick", "arguments": {"n": "2.0"}}', tools)
    assert calls[0].arguments == {"n": "2.0"}  # 2.0 is no member of an integer enum: left as written


def test_keywords_beside_any_of_guide_argument_coercion() -> None:
    box = {"type": "object", "properties": {"n": {"type": "integer"}}, "anyOf": [{"required": ["n"]}]}
    tools = {"count": {"type": "object", "properties": {"box": box}}}
    _, calls, problems = parse_tool_calls('{"name": "count", "arguments": {"box": {"n": "7"}}}', tools)
    assert problems == [] and calls[0].arguments == {"box": {"n": 7}}


CUT_EMAIL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "tags": ["rain", "wi'


@pytest.mark.parametrize(
    "text",
    [
        CUT_EMAIL,
        '{"name": "get_weather", "arguments": {"city": "Par',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3',
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3',
        '<function=get_weather>{"city": "Paris", "days": 1',
    ],
)
def test_a_call_cut_off_by_the_token_budget_is_a_problem_not_a_call(text: str) -> None:
    """Repair would close the call with its arguments cut short, and an agent would run it."""
    assert calls_of(text)[1]  # what repair makes of it when the reply ended by itself
    _, calls, problems = parse_tool_calls(text, TOOLS, cut=True)
    assert calls == [] and len(problems) == 1 and "'get_weather' was cut off by max_tokens" in problems[0]


def test_only_the_call_the_budget_cut_is_dropped() -> None:
    whole = '<tool_call>{"name": "noop", "arguments": {}}</tool_call>\n'
    _, calls, problems = parse_tool_calls(whole + CUT_EMAIL, TOOLS, cut=True)
    assert [c.name for c in calls] == ["noop"] and len(problems) == 1 and "cut off" in problems[0]
    closed = parse_tool_calls(whole + "Then I will check (maybe", TOOLS, cut=True)  # cut in prose after a call
    assert [c.name for c in closed[1]] == ["noop"] and closed[2] == [] and closed[0] == "Then I will check (maybe"
    assert parse_tool_calls("An answer cut off (mid", TOOLS, cut=True) == ("An answer cut off (mid", [], [])


PARIS_CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.mark.parametrize(
    ("text", "content", "kept", "noted"),
    [
        (PARIS_CALL + '\nI called it "because', 'I called it "because', 1, False),  # prose cut: calls whole
        ("```json\n" + PARIS_CALL + "\n```\nThen I will check [maybe", None, 1, False),
        (PARIS_CALL + '\n{"name": "noop", "arguments": {', "", 1, True),  # the next call cut: said
        ("Sure.\n<tool_call>" + PARIS_CALL + '</tool_call>\n<tool_call>\n{"na', "Sure.", 1, True),
        ('<tool_call>\n{"na', "", 0, True),  # a call cut before it could be read is said too
    ],
)
def test_calls_before_the_cut_are_kept(text: str, content: str | None, kept: int, noted: bool) -> None:
    """Only what the budget cut is lost: whole calls before it stay calls, and a cut call is always said."""
    got, calls, problems = parse_tool_calls(text, TOOLS, cut=True)
    assert [c.name for c in calls] == ["get_weather"] * kept
    assert bool(problems) == noted and all("cut off by max_tokens" in p for p in problems)
    assert content is None or got == content


def test_a_closing_tag_inside_a_string_argument_does_not_end_the_call() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "use </tool_call> tags"}}\n</tool_call> Done.'
    assert calls_of(text) == ("Done.", [("get_weather", {"city": "use </tool_call> tags"})], [])


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "string"},
        {"type": "array", "items": {"type": "integer"}},
        {"type": ["object", "null"]},
        {"anyOf": [{"type": "object", "properties": {"a": {"type": "string"}}}, {"type": "null"}]},
    ],
)
def test_a_tool_whose_parameters_are_not_an_object_is_refused(parameters: dict[str, Any]) -> None:
    from kvpack_integrations.engine.chat import tool_parameters

    spec = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    with pytest.raises(InvalidInputError, match="tool 'f' cannot be called: its parameters must be a JSON object"):
        tool_parameters([spec])
    objects = {"anyOf": [{"type": "object"}, {"properties": {"b": {}}}]}
    assert tool_parameters([{"type": "function", "function": {"name": "g", "parameters": objects}}])
