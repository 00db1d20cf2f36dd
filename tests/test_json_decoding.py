"""Schema-guided JSON decoding on tiny random models: the output always parses and validates."""

from __future__ import annotations

import enum
import json
from typing import Any, Literal

import jsonschema
import pytest
import torch
from pydantic import BaseModel, Field

from kvpack_integrations import Engine, GenerationSettings
from kvpack_integrations.composition.cache_ops import forward
from kvpack_integrations.engine.json_decoding import GuidedDecoder, check_schema, generate_json
from kvpack_integrations.engine.tool_calls import parse_tool_calls
from kvpack_integrations.errors import InvalidInputError
from kvpack_integrations.runtime import LoadedModel

from .support.tiny_models import make_model

FAMILIES = ["llama", "qwen2", "gemma"]
_MODELS: dict[str, LoadedModel] = {}


def model(family: str) -> LoadedModel:
    if family not in _MODELS:
        _MODELS[family] = make_model(family)
    return _MODELS[family]


def prompt(loaded: LoadedModel) -> list[int]:
    return loaded.tokenizer.encode("Reply with JSON about the Aurora X2 drone:", add_special_tokens=False)


class Color(str, enum.Enum):
    red = "red"
    green = "green"


class Address(BaseModel):
    city: str
    zip: int | None = None


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=0)


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Person(BaseModel):
    name: str
    age: int
    height: float
    active: bool
    role: Literal["admin", "user"]
    color: Color
    tags: list[str] = Field(max_length=3)
    address: Address
    nickname: str | None = None
    score: int | str = 0
    pet: Cat | Dog
    pair: tuple[int, str]
    matrix: list[list[float]] = Field(min_length=1, max_length=2)


SCHEMA = Person.model_json_schema()


def run(family: str, schema: Any, **settings: Any) -> Any:
    """Random weights rarely close a string: a cap of 64 tokens keeps these runs short (and says so)."""
    loaded = model(family)
    settings.setdefault("max_new_tokens", 2000)
    return generate_json(Engine(loaded), prompt(loaded), schema, GenerationSettings(**settings), max_string_tokens=64)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature", [0.0, 1.2])
def test_nested_pydantic_schema_parses_and_validates(family: str, temperature: float) -> None:
    result = run(family, SCHEMA, temperature=temperature, seed=7)
    assert result.finish_reason == ("length" if result.strings_cut else "stop")  # a cut string is no clean stop
    assert json.loads(result.text) == result.value
    jsonschema.validate(result.value, SCHEMA)
    Person.model_validate(result.value)
    # the model saw exactly the JSON it returns: literal structure and chosen values alike
    tokenizer = model(family).tokenizer
    assert tokenizer.decode(result.token_ids, skip_special_tokens=False) == result.text
    u = result.usage
    assert u.prefilled_tokens > 0 and u.output_tokens == len(result.token_ids) > 0
    assert 0 < u.ttft_ms <= u.total_ms


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [1, 6, 25])
def test_budget_cutoff_still_yields_valid_json(family: str, budget: int) -> None:
    result = run(family, SCHEMA, max_new_tokens=budget)
    assert result.finish_reason == "length"
    assert len(result.token_ids) == budget == result.usage.output_tokens
    jsonschema.validate(json.loads(result.text), SCHEMA)
    assert "nickname" not in result.value  # optional parts are left out once the budget is spent


def test_exact_budget_is_a_clean_stop() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    needed = len(run("llama", schema).token_ids)
    assert run("llama", schema, max_new_tokens=needed).finish_reason == "stop"
    assert run("llama", schema, max_new_tokens=needed - 1).finish_reason == "length"
    # complete: the model made every choice (a budget ending inside the closing brace leaves none to it)
    assert run("llama", schema, max_new_tokens=needed + 1).complete
    assert not run("llama", schema, max_new_tokens=1).complete


def test_sampling_is_reproducible_with_a_seed() -> None:
    def sample(seed: int) -> str:
        return run("qwen2", SCHEMA, temperature=1.5, top_p=0.95, top_k=50, seed=seed).text

    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) > 1


SMALL_SCHEMAS: list[dict[str, Any]] = [
    {"type": "integer", "minimum": 0},
    {"type": "number"},
    {"type": "boolean"},
    {"type": "null"},
    {"type": ["string", "null"]},
    {"enum": ["a", "ab", "abc", 1, None, {"x": [1]}]},
    {"const": "fixed"},
    {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "null"}, {"type": "boolean"}]},
    {"type": "array", "items": {"type": ["integer", "null"]}, "minItems": 2, "maxItems": 4},
    {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 0},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}], "items": False},
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]},
    {"type": "object", "properties": {"a": {"type": "string"}, "b": {"const": 3}}},
    {"type": "object", "additionalProperties": {"type": "integer"}},
    {"allOf": [{"$ref": "#/$defs/A"}], "$defs": {"A": {"properties": {"q": {"type": "boolean"}}, "required": ["q"]}}},
    {"type": "object", "properties": {"v": {"type": "integer", "nullable": True}}, "required": ["v"]},
    # a property in two allOf parts is held to both (the second part's schema used to replace the first's)
    {
        "allOf": [
            {"properties": {"x": {"enum": [1, 2, 3]}}, "required": ["x"]},
            {"properties": {"x": {"type": "integer"}}},
        ]
    },
    # enums in two parts meet (3 is the only value both allow); items in both are held to both
    {"allOf": [{"properties": {"x": {"enum": [1, 2, 3]}}, "required": ["x"]}, {"properties": {"x": {"enum": [3, 4]}}}]},
    {"allOf": [{"type": "array", "items": {"enum": ["a", "b"]}}, {"items": {"enum": ["b", "c"]}, "minItems": 2}]},
]


@pytest.mark.parametrize("schema", SMALL_SCHEMAS, ids=lambda s: json.dumps(s)[:40])
def test_every_supported_keyword_validates_across_seeds_and_budgets(schema: dict[str, Any]) -> None:
    for family in FAMILIES:
        for settings in ({}, {"temperature": 1.3, "seed": 3}, {"temperature": 1.0, "seed": 4, "max_new_tokens": 3}):
            result = run(family, schema, **settings)
            jsonschema.validate(json.loads(result.text), schema)


def test_free_form_objects() -> None:
    for schema in ({}, {"type": "object"}, {"title": "Anything", "description": "ignored"}):
        for seed in range(4):
            value = run("llama", schema, temperature=1.5, seed=seed).value
            assert isinstance(value, dict) and len(value) <= 8
            assert all(isinstance(v, str | int | float | bool) or v is None for v in value.values())


def test_a_second_identical_call_gives_identical_output_and_the_tree_is_untouched() -> None:
    loaded = model("llama")
    engine = Engine(loaded)
    ids = prompt(loaded)
    segments, _ = engine.cache_prefix(ids, [len(ids) - 2])
    before = [k.clone() for k in segments[0].keys]
    first = generate_json(engine, ids, SCHEMA, GenerationSettings(max_new_tokens=300))
    second = generate_json(engine, ids, SCHEMA, GenerationSettings(max_new_tokens=300))
    assert first.usage.cached_tokens == len(ids) - 2 == second.usage.cached_tokens
    assert first.text == second.text and first.token_ids == second.token_ids
    assert all(torch.equal(a, b) for a, b in zip(before, segments[0].keys))


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "widget"}, "'widget'"),
        ({"type": ["string", "date"]}, "'date'"),
        ({"$ref": "https://example.com/schema.json"}, "remote $ref"),
        ({"$ref": "#/$defs/Missing"}, "#/$defs/Missing"),
        (
            {"$ref": "#/$defs/Node", "$defs": {"Node": {"properties": {"next": {"$ref": "#/$defs/Node"}}}}},
            "recursive $ref '#/$defs/Node'",
        ),
        ({"enum": []}, "enum"),
        ({"anyOf": []}, "anyOf"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
        ({"properties": {}, "required": ["a"], "additionalProperties": False}, "['a']"),
        ({"type": "object", "properties": {"x": 3}}, "#/properties/x"),
    ],
)
def test_bad_schemas_are_refused_with_the_problem_named(schema: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidInputError, match=None) as info:
        check_schema(schema)
    assert problem in str(info.value)
    with pytest.raises(InvalidInputError):
        run("llama", schema)


def test_choose_handles_options_that_share_a_prefix() -> None:
    loaded = model("llama")
    engine = Engine(loaded)
    settings = GenerationSettings(max_new_tokens=50)

    def encode(text: str) -> list[int]:
        return loaded.tokenizer.encode(text, add_special_tokens=False)

    options = ["Paris", "Paris Kelmark", "Ondria"]
    head = encode("Paris")
    assert encode("Paris Kelmark")[: len(head)] == head  # one option is a token prefix of another
    for question in ("Where?", "Which city is it based in?", "Name a town.", "Fact one."):
        ids = encode(question)
        decoder = GuidedDecoder(engine, engine.prefill(ids, settings), settings)
        index = decoder.choose(options)
        decoder.finish_usage()
        assert decoder.text == options[index] and decoder.token_ids == encode(options[index])
        # replay by hand: greedy takes the better first token, then goes on only if the model prefers to
        state = engine.prefill(ids, settings)
        pick = "Paris" if state.logits[head[0]] > state.logits[encode("Ondria")[0]] else "Ondria"
        if pick == "Paris":
            logits = forward(loaded, state.cache, head)
            pick = "Paris Kelmark" if int(torch.argmax(logits)) == encode("Paris Kelmark")[len(head)] else "Paris"
        assert options[index] == pick


def test_a_forced_tool_call_written_by_the_decoder_parses_back() -> None:
    tools = {
        "get_weather": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
        "noop": {"type": "object", "properties": {}},
    }
    loaded = model("qwen2")
    engine = Engine(loaded)
    settings = GenerationSettings(max_new_tokens=200)
    decoder = GuidedDecoder(engine, engine.prefill(prompt(loaded), settings), settings, max_string_tokens=8)
    decoder.emit('<tool_call>\n{"name": ')
    name = list(tools)[decoder.choose([json.dumps(n) for n in tools])]
    decoder.emit(', "arguments": ')
    arguments = decoder.value(tools[name])
    decoder.emit("}\n</tool_call>")
    usage = decoder.finish_usage()
    assert usage.output_tokens == len(decoder.token_ids) < settings.max_new_tokens  # the budget never ran out
    content, calls, problems = parse_tool_calls(decoder.text, tools)
    assert (content, problems) == ("", [])
    assert [(c.name, c.arguments) for c in calls] == [(name, arguments)]


def test_max_string_tokens_caps_strings() -> None:
    loaded = model("gemma")
    engine = Engine(loaded)
    settings = GenerationSettings(max_new_tokens=100)
    decoder = GuidedDecoder(engine, engine.prefill(prompt(loaded), settings), settings, max_string_tokens=3)
    value = decoder.value({"type": "string"})
    decoder.finish_usage()
    assert json.loads(decoder.text) == value and len(decoder.token_ids) <= 3 + 2
    assert decoder.truncated == (len(decoder.token_ids) == 3 + 2)  # cut by the cap, not closed: said so
    with pytest.raises(InvalidInputError):
        GuidedDecoder(engine, engine.prefill(prompt(loaded), settings), settings, max_string_tokens=0)


def test_strings_run_to_the_budget_by_default() -> None:
    """No silent cap on string values: a string the model does not close runs until the budget ends, and
    the result then says `length` (it used to stop at 64 tokens and say `stop`)."""
    loaded = model("qwen2")
    engine = Engine(loaded)
    schema = {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}
    lengths = []
    for seed in range(4):
        settings = GenerationSettings(max_new_tokens=150, temperature=1.0, seed=seed)
        result = generate_json(engine, prompt(loaded), schema, settings)
        jsonschema.validate(result.value, schema)
        assert (result.finish_reason == "length") == (len(result.token_ids) >= 150)
        lengths.append(len(result.token_ids))
    assert max(lengths) > 80, lengths


def test_keywords_beside_any_of_constrain_every_branch() -> None:
    """`properties` and `type` next to `anyOf` hold in each branch: `a` is an integer whichever branch
    (a's type used to be dropped, so `{"a": "text"}` came out)."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
        "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
    }
    for family in FAMILIES:
        for seed in range(6):
            result = run(family, schema, temperature=1.3, seed=seed, max_new_tokens=80)
            jsonschema.validate(result.value, schema)
    # a property in both places is held to both: the outer integer type survives the branch's bounds
    both = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "anyOf": [{"properties": {"n": {"minimum": 5}}}, {"properties": {"n": {"type": "number", "maximum": -5}}}],
    }
    for seed in range(6):
        value = run("qwen2", both, temperature=1.3, seed=seed, max_new_tokens=40).value
        assert isinstance(value["n"], int) and not isinstance(value["n"], bool), value


def test_a_discriminator_after_a_shared_key_still_chooses_the_branch() -> None:
    """Cat and Dog both open with `name`: each branch's discriminator is written first, so both occur
    (before, `{"name": "` opened both alike and Cat always won)."""

    class Cat2(BaseModel):
        name: str
        pet_type: Literal["cat"]

    class Dog2(BaseModel):
        name: str
        pet_type: Literal["dog"]

    class Owner(BaseModel):
        pet: Cat2 | Dog2 = Field(discriminator="pet_type")  # oneOf of $refs beside a discriminator mapping

    class PlainOwner(BaseModel):
        pet: Cat2 | Dog2  # anyOf of $refs alone

    for owner in (Owner, PlainOwner):
        kinds = set()
        for family in FAMILIES:
            for seed in range(5):
                result = run(family, owner.model_json_schema(), temperature=1.5, seed=seed, max_new_tokens=60)
                kinds.add(owner.model_validate(result.value).pet.pet_type)
        assert kinds == {"cat", "dog"}, owner


def test_no_string_holds_a_replacement_mark() -> None:
    """Inside a multi-byte character only byte pieces that continue it as valid UTF-8 may follow, and a
    character the token budget cuts is left out, so no string holds U+FFFD (random weights at a high
    temperature pick byte pieces often; small budgets cut characters)."""
    schema = {"type": "array", "items": {"type": "string"}, "minItems": 1}
    marked = []
    for family in FAMILIES:
        for seed in range(10):
            for budget in (5, 9, 14, 60):
                value = run(family, schema, temperature=2.0, seed=seed, max_new_tokens=budget).value
                marked += [(family, seed, budget, s) for s in value if "\ufffd" in s]
    assert marked == []


def test_schemas_that_must_both_hold_and_share_no_value_are_refused() -> None:
    """allOf parts with no common value are refused by name; beside anyOf, a branch no value can satisfy
    is simply not an option (the others are)."""
    for schema, problem in (
        ({"allOf": [{"enum": [1, 2]}, {"enum": [3]}]}, "no common value: enum"),
        ({"allOf": [{"const": 1}, {"const": 2}]}, "fix different values: 1 and 2"),
        ({"allOf": [{"enum": ["a", "b"]}, {"const": "c"}]}, "'c' is not in"),
    ):
        with pytest.raises(InvalidInputError, match=problem):
            run("qwen2", schema, max_new_tokens=8)
    union = {
        "type": "object",
        "properties": {"kind": {"enum": ["a", "b"]}},
        "required": ["kind"],
        "anyOf": [{"properties": {"kind": {"const": "a"}}}, {"properties": {"kind": {"const": "c"}}}],
    }
    for seed in range(4):
        assert run("qwen2", union, temperature=1.5, seed=seed, max_new_tokens=20).value == {"kind": "a"}
