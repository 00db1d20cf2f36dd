"""KVPackChatModel on tiny models of every family: segments equal text stuffing, agent steps prefill only
what is new, tools and structured output, async/stream/batch, and bad input."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from pydantic import BaseModel, Field

from kvpack_integrations import build_pack, load_model
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.errors import (
    FingerprintMismatchError,
    InvalidInputError,
    UnknownKnowledgeBaseError,
)
from kvpack_integrations.langchain import KVPackChatModel
from kvpack_integrations.segments.handles import HANDLE_KEY, SegmentHandle

from .conftest import FACTS, QUESTION
from .support.scripted_engine import ScriptedEngine
from .support.tiny_models import FAMILIES, save_model_dir

MAX = 12
DOCS = ["The Tessel-9 battery is made by Quill Energy in Ondria.", "The Aurora X2 drone flies for 48 minutes."]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("models")


def _chat(model_root, family: str = "llama", **kwargs) -> KVPackChatModel:
    return KVPackChatModel(model=save_model_dir(family, model_root), max_tokens=MAX, **kwargs)


def _tool_history(docs: list[Document]) -> list:
    call = {"name": "search_knowledge", "args": {"query": "battery"}, "id": "call_1", "type": "tool_call"}
    return [
        SystemMessage("Answer briefly."),
        HumanMessage(QUESTION),
        AIMessage("", tool_calls=[call]),
        ToolMessage("\n\n".join(d.page_content for d in docs), tool_call_id="call_1", artifact=docs),
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_documents_as_segments_equal_text_stuffing(model_root, family: str) -> None:
    chat = _chat(model_root, family)
    messages = [SystemMessage("Answer briefly."), HumanMessage(QUESTION)]
    text = chat.invoke(messages, documents=DOCS, strategy="text")
    kv = chat.invoke(messages, documents=DOCS)  # the text call above was not cached: prefix cold here too
    again = chat.invoke(messages, documents=DOCS)
    assert kv.content == text.content == again.content
    assert text.usage_metadata["input_token_details"]["cache_read"] == 0
    assert again.usage_metadata["input_token_details"]["cache_read"] == again.usage_metadata["input_tokens"] - 1
    meta = again.response_metadata
    assert meta["kvpack"]["strategy"] == "exact" and meta["kvpack"]["exact"] is True
    assert meta["model_name"].startswith("tiny-") or family in meta["model_name"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "mistral", "phi3"])
def test_tool_artifacts_equal_text_and_next_step_prefills_only_new_tokens(model_root, family: str) -> None:
    chat = _chat(model_root, family)
    docs = [Document(d) for d in DOCS]
    history = _tool_history(docs)
    step1 = chat.invoke(history[:2])
    step2 = chat.invoke(history)
    text = chat.invoke(history, strategy="text")
    assert step2.content == text.content
    new_tokens = step2.usage_metadata["input_tokens"] - step1.usage_metadata["input_tokens"]
    prefilled = step2.response_metadata["kvpack"]["prefilled_tokens"]
    assert prefilled <= new_tokens  # the whole step-1 prompt came from cache
    assert step2.usage_metadata["input_token_details"]["cache_read"] >= step1.usage_metadata["input_tokens"]


def test_tool_artifacts_in_another_order_or_twice(model_root) -> None:
    """An artifact may list its documents in another order than the content, or hold one twice: the
    documents are placed in the content's order (the answer equals text stuffing), and the one that
    does not occur again gets a note instead of failing the request."""
    chat = _chat(model_root)
    a, b = DOCS[0], DOCS[1]
    history = _tool_history([Document(b), Document(a)])  # content: b then a
    reordered = [
        *history[:3],
        ToolMessage(history[3].content, tool_call_id="call_1", artifact=[Document(a), Document(b)]),
    ]
    assert chat.invoke(reordered).content == chat.invoke(history, strategy="text").content
    twice = [
        *history[:3],
        ToolMessage(history[3].content, tool_call_id="call_1", artifact=[Document(b), Document(b), Document(a)]),
    ]
    reply = chat.invoke(twice)
    assert reply.content == chat.invoke(history, strategy="text").content
    assert any("not again" in n for n in reply.response_metadata["kvpack"]["notes"])


def test_bound_knowledge_base_is_served_from_the_store(model_root, store) -> None:
    directory = save_model_dir("qwen2", model_root)
    loaded = load_model(directory)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "energy", FACTS)
    chat = KVPackChatModel(model=directory, kb="energy", store=str(store.root), max_tokens=MAX)
    reply = chat.invoke(QUESTION)
    plain = KVPackChatModel(model=directory, max_tokens=MAX).invoke(QUESTION, documents=FACTS, strategy="text")
    assert reply.content == plain.content
    pack_tokens = store.manifest("energy").token_count
    assert reply.usage_metadata["input_token_details"]["cache_read"] >= pack_tokens
    # evicted from the tree: reloaded from the store, not recomputed
    from kvpack_integrations.engine.registry import shared_engine

    shared_engine(loaded).tree.clear()
    again = chat.invoke(QUESTION + " ")
    assert any("loaded from" in n for n in again.response_metadata["kvpack"]["notes"])
    assert again.usage_metadata["input_token_details"]["cache_read"] >= pack_tokens


def test_documents_in_pack_order_open_their_stored_pack(model_root, store) -> None:
    """Retrieved documents that start with a pack's first fact are served from the stored pack."""
    from kvpack_integrations.engine.registry import shared_engine
    from kvpack_integrations.langchain import KVPackRetriever

    directory = save_model_dir("llama", model_root)
    loaded = load_model(directory)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "opened", FACTS)
    retriever = KVPackRetriever(kb="opened", store=str(store.root), k=len(FACTS))
    docs = sorted(retriever.invoke(QUESTION), key=lambda d: d.metadata[HANDLE_KEY]["fact_index"])
    chat = KVPackChatModel(model=directory, max_tokens=MAX)
    shared_engine(loaded).tree.clear()
    reply = chat.invoke(QUESTION, documents=docs)
    assert reply.content == chat.invoke(QUESTION, documents=FACTS, strategy="text").content
    assert any("that the documents open loaded from" in n for n in reply.response_metadata["kvpack"]["notes"])
    assert reply.usage_metadata["input_token_details"]["cache_read"] >= store.manifest("opened").token_count
    # out of pack order nothing is loaded (the texts are the same, the prefix is not)
    shared_engine(loaded).tree.clear()
    shuffled = chat.invoke(QUESTION, documents=docs[::-1])
    assert not any("loaded from" in n for n in shuffled.response_metadata["kvpack"]["notes"])
    assert shuffled.usage_metadata["input_token_details"]["cache_read"] < store.manifest("opened").token_count


def test_unknown_knowledge_base_is_named_at_construction(store) -> None:
    with pytest.raises(UnknownKnowledgeBaseError, match="no knowledge base named 'missing'"):
        KVPackChatModel(kb="missing", store=str(store.root))


def _foreign(doc: str) -> Document:
    handle = SegmentHandle("/elsewhere", "kb", 0, "seg", "0123456789abcdef", "other-model")
    return Document(doc, metadata={HANDLE_KEY: handle.to_dict()})


def test_documents_from_another_models_store(model_root) -> None:
    chat = _chat(model_root)
    docs = [_foreign(d) for d in DOCS]
    reply = chat.invoke(_tool_history(docs))
    notes = reply.response_metadata["kvpack"]["notes"]
    assert any("other-model" in n and "computed on this model" in n for n in notes)
    assert reply.content == chat.invoke(_tool_history([Document(d) for d in DOCS]), strategy="text").content
    strict = _chat(model_root, strict_segments=True)
    with pytest.raises(FingerprintMismatchError, match="other-model"):
        strict.invoke(_tool_history(docs))
    with pytest.raises(InvalidInputError, match="handle lacks"):
        chat.invoke(QUESTION, documents=[Document("x", metadata={HANDLE_KEY: {"pack": "kb"}})])


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def lookup(city: str) -> str:
    """Look up a city."""
    return city


def _whole_or_cut(reply: AIMessage, names: tuple[str, ...]) -> None:
    """A forced call is whole and valid ("tool_calls"), or max_tokens cut it: then it is no call but an
    invalid one saying so ("length"), never a call of cut or placeholder arguments."""
    if reply.response_metadata["finish_reason"] == "length":
        assert reply.tool_calls == [] and "max_tokens ran out" in reply.invalid_tool_calls[0]["error"]
    else:
        assert reply.response_metadata["finish_reason"] == "tool_calls" and reply.invalid_tool_calls == []
        assert len(reply.tool_calls) == 1 and reply.tool_calls[0]["name"] in names
        assert len(reply.tool_calls[0]["id"]) == 9


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3"])
def test_forced_tool_calls_are_valid_on_random_weights(model_root, family: str) -> None:
    chat = KVPackChatModel(model=save_model_dir(family, model_root), max_tokens=200)
    _whole_or_cut(chat.bind_tools([add, lookup], tool_choice="any").invoke("What is 2 + 3?"), ("add", "lookup"))
    named = chat.bind_tools([add, lookup], tool_choice="add").invoke("What is 2 + 3?")
    assert named.tool_calls[0]["name"] == "add" and isinstance(named.tool_calls[0]["args"]["b"], int)
    assert isinstance(named.tool_calls[0]["args"]["a"], int)
    assert named.response_metadata["finish_reason"] == "tool_calls"
    # a string argument runs until the model closes it or max_tokens ends (random weights seldom close one)
    _whole_or_cut(chat.bind_tools([add, lookup], tool_choice="lookup").invoke("Where?"), ("lookup",))


def test_a_forced_call_cut_by_max_tokens_is_invalid_on_both_paths(model_root) -> None:
    """A forced call the budget cut was closed by the engine and returned valid, its arguments placeholders
    or cut short (an agent ran it); it is an invalid call with the reason, as a cut free-text call is."""
    short = _chat(model_root).bind_tools([add, lookup], tool_choice="lookup")  # MAX tokens: too few
    reply, streamed = _invoked_and_streamed(short)
    for message in (reply, streamed):
        assert message.tool_calls == [] and message.response_metadata["finish_reason"] == "length"
        (invalid,) = message.invalid_tool_calls
        assert "max_tokens ran out while the model wrote the call to 'lookup'" in invalid["args"]
        assert "raise max_tokens" in invalid["args"]
        assert message.response_metadata["invalid_tool_call_errors"] == [invalid["args"]]
        assert invalid["args"] in message.response_metadata["kvpack"]["notes"]
    assert reply.invalid_tool_calls[0]["error"] == reply.invalid_tool_calls[0]["args"]
    raw = _chat(model_root).with_structured_output(Person, method="function_calling", include_raw=True)
    out = raw.invoke("Who?")  # structured output through a cut call: nothing parsed, and the error says why
    assert out["parsed"] is None and "raise max_tokens" in str(out["parsing_error"])
    assert "the call to 'Person'" in out["raw"].invalid_tool_calls[0]["error"]


def test_tool_choice_and_schema_errors(model_root) -> None:
    chat = _chat(model_root)
    with pytest.raises(InvalidInputError, match="not auto/none/any/required or a given tool"):
        chat.bind_tools([add], tool_choice="multiply")
    bad = {"type": "function", "function": {"name": "remote", "parameters": {"$ref": "https://x/schema.json"}}}
    with pytest.raises(InvalidInputError, match="tool 'remote' cannot be called"):
        chat.bind_tools([bad])
    with pytest.raises(InvalidInputError, match="unknown call options"):
        chat.invoke("hi", frobnicate=1)
    with pytest.raises(InvalidInputError, match="unknown arguments: frobnicate"):
        KVPackChatModel(frobnicate=1)
    # constructor options are checked as a call's: pydantic made max_tokens=True one token, "5" five
    for name, value, kind in [
        ("max_tokens", True, "an integer"),
        ("max_tokens", "5", "an integer"),
        ("seed", True, "an integer"),
        ("top_k", 2.5, "an integer"),
        ("temperature", True, "a number"),
        ("top_p", "0.9", "a number"),
    ]:
        with pytest.raises(InvalidInputError, match=f"{name} must be {kind}"):
            KVPackChatModel(**{name: value})
        with pytest.raises(InvalidInputError, match=f"{name} must be {kind}"):
            chat.invoke("hi", **{name: value})
    image = HumanMessage(content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}])
    with pytest.raises(InvalidInputError, match="content blocks of type 'image_url' are not supported"):
        chat.invoke([image])


class Person(BaseModel):
    """A person."""

    name: str = Field(description="full name")
    age: int
    tags: list[str] = Field(default_factory=list)


def test_a_forced_call_whose_closing_markup_passes_max_tokens_is_whole(model_root) -> None:
    """Only the engine's closing markup past the budget: every choice was the model's, so the call stands
    (it was reported "length", as if its arguments might be cut short). Qwen's call closes with several
    tokens of markup (`}}` then `</tool_call>`), so one token less than the call leaves the arguments whole."""
    chat = KVPackChatModel(model=save_model_dir("qwen2", model_root), max_tokens=200).bind_tools(
        [add], tool_choice="add"
    )
    full = chat.invoke("What is 2 + 3?")
    assert full.response_metadata["finish_reason"] == "tool_calls"
    tight = chat.invoke("What is 2 + 3?", max_tokens=full.usage_metadata["output_tokens"] - 1)
    assert tight.tool_calls[0]["args"] == full.tool_calls[0]["args"] and tight.invalid_tool_calls == []
    assert tight.response_metadata["finish_reason"] == "tool_calls"
    notes = tight.response_metadata["kvpack"]["notes"]
    assert any("closing markup" in n and "went past max_tokens" in n for n in notes)


class Reading(BaseModel):
    """A reading: what random weights write whole (no free-text string, which they seldom close)."""

    minutes: int
    unit: Literal["min", "h"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_validates_on_random_weights(model_root, method: str) -> None:
    # function_calling writes a forced call, and one that max_tokens cuts is no call (the test above): it
    # gets a schema random weights complete; the JSON methods end a string max_tokens cuts where it is cut
    schema = Reading if method == "function_calling" else Person
    chat = KVPackChatModel(model=save_model_dir("llama", model_root), max_tokens=96)
    value = chat.with_structured_output(schema, method=method).invoke("Describe someone.")
    assert isinstance(value, schema)
    raw = chat.with_structured_output(schema.model_json_schema(), method=method, include_raw=True).invoke("Who?")
    assert raw["parsing_error"] is None and set(raw["parsed"]) >= set(schema.model_json_schema()["required"])
    assert isinstance(raw["raw"], AIMessage)


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_structured_output_cut_by_max_tokens_is_refused_not_parsed(model_root, method: str) -> None:
    """Past the budget the engine closes the JSON with fillers that validate (a cut string, 0, ""): parsed,
    they would be taken for the model's answer. The reply says so, and the structured output refuses it."""
    chat = KVPackChatModel(model=save_model_dir("llama", model_root), max_tokens=3)
    schema = Person if method == "json_schema" else None
    with pytest.raises(InvalidInputError, match="max_tokens ran out while the model wrote the structured output"):
        chat.with_structured_output(schema, method=method).invoke("Who?")
    out = chat.with_structured_output(schema, method=method, include_raw=True).invoke("Who?")
    assert out["parsed"] is None and "raise max_tokens" in str(out["parsing_error"])
    metadata = out["raw"].response_metadata
    assert metadata["finish_reason"] == "length" and "raise max_tokens" in metadata["structured_output_error"]
    whole = KVPackChatModel(model=save_model_dir("llama", model_root), max_tokens=64)
    assert isinstance(
        whole.with_structured_output(Reading, method=method if schema else "json_schema").invoke("?"), Reading
    )


def test_structured_output_takes_any_json_schema_dict(model_root) -> None:
    """A dict is a JSON schema as given (a root anyOf, $ref or enum), not an empty object: only
    OpenAI-tool-shaped dicts are converted."""
    import jsonschema

    pet = {
        "title": "Pet",
        "anyOf": [
            {"type": "object", "properties": {"cat_lives": {"type": "integer"}}, "required": ["cat_lives"]},
            {"type": "object", "properties": {"dog_age": {"type": "integer"}}, "required": ["dog_age"]},
        ],
    }
    ref = {"$ref": "#/$defs/size", "$defs": {"size": {"enum": ["small", "large"]}}}
    chat = KVPackChatModel(model=save_model_dir("llama", model_root), max_tokens=48)
    for schema in (pet, ref):
        for seed in range(2):
            value = chat.with_structured_output(schema, method="json_schema").invoke("Describe it.", seed=seed)
            jsonschema.validate(value, schema)
            assert value not in ({}, None), schema
    tool = {"name": "pet", "description": "A pet.", "parameters": pet["anyOf"][1]}
    assert set(chat.with_structured_output(tool, method="json_schema").invoke("Age?")) == {"dog_age"}
    anthropic = {"name": "pet", "description": "A pet.", "input_schema": pet["anyOf"][1]}
    assert set(chat.with_structured_output(anthropic, method="json_schema").invoke("Age?")) == {"dog_age"}


def test_free_form_json_mode(model_root) -> None:
    chat = KVPackChatModel(model=save_model_dir("qwen2", model_root), max_tokens=64)
    assert isinstance(chat.with_structured_output(method="json_mode").invoke("JSON please"), dict)


async def test_async_stream_and_batch(model_root) -> None:
    chat = _chat(model_root, "phi3")
    reference = chat.invoke(QUESTION).content
    chunks = [c async for c in chat.astream(QUESTION)]
    assert "".join(str(c.content) for c in chunks) == reference
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata is not None
    assert [m.content for m in await chat.abatch([QUESTION, QUESTION])] == [reference, reference]
    assert [m.content for m in chat.batch([QUESTION, QUESTION])] == [reference, reference]
    assert (await chat.ainvoke(QUESTION)).content == reference
    streamed = list(chat.stream(QUESTION))
    assert "".join(str(c.content) for c in streamed) == reference


def test_stop_sequences_and_options(model_root) -> None:
    chat = _chat(model_root)
    full = str(chat.invoke(QUESTION).content)
    assert len(full) > 2
    stop = full[1:3]
    cut = chat.invoke(QUESTION, stop=[stop])
    assert cut.content == full[: full.index(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"
    short = chat.invoke(QUESTION, max_tokens=2)
    assert short.usage_metadata["output_tokens"] <= 2
    a = chat.invoke(QUESTION, temperature=1.0, seed=7).content
    assert a == chat.invoke(QUESTION, temperature=1.0, seed=7).content
    # per-call options are checked by the name the caller used, never coerced (2.7 used to become 2)
    for option, value, problem in (
        ("max_tokens", "many", "max_tokens must be an integer"),
        ("max_tokens", 2.7, "max_tokens must be an integer"),
        ("top_k", True, "top_k must be an integer"),
        ("temperature", "hot", "temperature must be a number"),
        ("seed", 1.5, "seed must be an integer"),
    ):
        with pytest.raises(InvalidInputError, match=problem):
            chat.invoke(QUESTION, **{option: value})


def test_empty_retrieval_is_a_graceful_path(model_root) -> None:
    """A retriever tool that found nothing: the model still answers, exactly as with text stuffing."""
    chat = _chat(model_root)
    call = {"name": "search_knowledge", "args": {"query": "x"}, "id": "call_1", "type": "tool_call"}
    for content in ("", "No matching documents were found."):
        history = [
            HumanMessage(QUESTION),
            AIMessage("", tool_calls=[call]),
            ToolMessage(content, tool_call_id="call_1", artifact=[]),
        ]
        assert chat.invoke(history).content == chat.invoke(history, strategy="text").content


def test_recursive_tool_schema_is_refused_with_its_name(model_root) -> None:
    recursive = {
        "type": "function",
        "function": {
            "name": "tree",
            "parameters": {
                "type": "object",
                "properties": {"node": {"$ref": "#/$defs/Node"}},
                "$defs": {
                    "Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}, "required": ["child"]}
                },
            },
        },
    }
    with pytest.raises(InvalidInputError, match="tool 'tree' cannot be called"):
        _chat(model_root).bind_tools([recursive])


def test_no_deadlock_when_a_stream_is_half_read_or_nested(model_root) -> None:
    """Decoding runs outside the engine lock: a caller may use the model inside or beside a stream."""
    import threading

    chat = _chat(model_root)
    reference = chat.invoke(QUESTION).content
    results: list = []

    def nested() -> None:
        stream = chat.stream(QUESTION)
        next(stream)  # left half-read
        for _ in chat.stream("Another question?"):
            results.append(chat.invoke(QUESTION).content)
            break
        results.append(chat.invoke(QUESTION).content)

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "a nested or half-read stream blocked the engine"
    assert results == [reference, reference]


def test_langchain_call_conventions(model_root) -> None:
    chat = KVPackChatModel(model=save_model_dir("llama", model_root), max_tokens=64)
    assert chat.invoke(QUESTION, stream=False).content == chat.invoke(QUESTION, max_tokens=None).content
    forced = chat.bind(tools=[add], tool_choice="any").invoke("2 + 3?")  # bind(), not bind_tools()
    assert forced.tool_calls[0]["name"] == "add"
    openai_shape = {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}}
    assert set(json.loads(chat.invoke("Who?", response_format=openai_shape).content)) >= {"name", "age"}
    assert isinstance(json.loads(chat.invoke("JSON", response_format={"type": "json_object"}).content), dict)
    with pytest.raises(InvalidInputError, match="response schema and callable tools"):
        chat.invoke("x", tools=[add], response_format=Person.model_json_schema())
    untitled = {"type": "object", "properties": {"floor": {"type": "integer"}}, "required": ["floor"]}
    assert set(chat.with_structured_output(untitled).invoke("Where?")) == {"floor"}


def test_bound_pack_rules(model_root, store) -> None:
    directory = save_model_dir("llama", model_root)
    loaded = load_model(directory)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "raw", FACTS, raw=True)
    with pytest.raises(InvalidInputError, match="raw, untemplated text"):
        KVPackChatModel(model=directory, kb="raw", store=str(store.root)).invoke(QUESTION)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS[:1])
    chat = KVPackChatModel(model=directory, kb="kb", store=str(store.root), max_tokens=MAX)
    first = chat.invoke(QUESTION)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)  # rebuilt with more facts
    after = chat.invoke(QUESTION)
    assert after.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"]
    plain = KVPackChatModel(model=directory, max_tokens=MAX).invoke(QUESTION, documents=FACTS, strategy="text")
    assert after.content == plain.content


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_text_twin_renders_to_the_same_prompt(model_root, family: str) -> None:
    """The plain messages a text-only model must be sent (`text_stuffed_messages`) render, through the
    model's own chat template, to exactly the prompt KVPackChatModel built: knowledge, system text and
    all (Gemma's template has no system role: the twin folds it as the rendering did)."""
    from kvpack_integrations.langchain.text_twin import text_stuffed_messages

    chat = _chat(model_root, family)
    twin = text_stuffed_messages(chat, [SystemMessage("Answer briefly."), HumanMessage(QUESTION)], documents=DOCS)
    assert any(isinstance(m, SystemMessage) for m in twin.messages) == (family not in ("gemma", "mistral"))
    roles = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}
    plain = [{"role": roles[type(m)], "content": m.content} for m in twin.messages]
    tokenizer = chat.loaded_model().tokenizer
    thinking = {"enable_thinking": False} if "enable_thinking" in tokenizer.chat_template else {}  # as rendered
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True, **thinking)
    assert list(tokenizer(text, add_special_tokens=False)["input_ids"]) == twin.token_ids


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_a_forced_call_is_written_as_the_template_renders_it(model_root, family: str, monkeypatch) -> None:
    """Under tool_choice the engine writes the call's markup itself: in the template's own format
    (Llama 3.1 `{"name", "parameters"}`, Mistral `[TOOL_CALLS] [{..., "id"}]`, Qwen `<tool_call>`), so
    the next step's prompt starts with this step's prompt and the call exactly as written."""
    from kvpack_integrations.engine import json_decoding
    from kvpack_integrations.engine.chat import prepare
    from kvpack_integrations.engine.registry import shared_engine

    written: list[str] = []
    finish = json_decoding.GuidedDecoder.finish_usage

    def spy(self):  # records what the decoder wrote, then finishes as usual
        written.append(self.text)
        return finish(self)

    monkeypatch.setattr(json_decoding.GuidedDecoder, "finish_usage", spy)
    chat = KVPackChatModel(model=save_model_dir(family, model_root), max_tokens=60)
    loaded = chat.loaded_model()
    first = [HumanMessage("What is 2 + 3?")]
    reply = chat.bind_tools([add], tool_choice="add").invoke(first)
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    call_id = reply.tool_calls[0]["id"]
    second = [*first, reply, ToolMessage("5", tool_call_id=call_id)]

    def rendered(messages) -> str:
        request, _ = chat._request(messages, None, {"tools": [add]}, loaded, take_run=False)
        with shared_engine(loaded).lock:
            return prepare(shared_engine(loaded), request)[0].rendered.text

    assert rendered(second).startswith(rendered(first) + written[-1]), written[-1]


def _scripted(model_root, monkeypatch, reply: str, **kwargs) -> tuple[KVPackChatModel, ScriptedEngine]:
    """A chat model whose engine replays `reply` (on the llama tiny model's tokenizer)."""
    chat = _chat(model_root, **kwargs)
    engine = ScriptedEngine(chat.loaded_model())
    engine.reply = reply
    monkeypatch.setattr("kvpack_integrations.langchain.chat_model.shared_engine", lambda loaded: engine)
    return chat, engine


def _invoked_and_streamed(runnable) -> tuple:
    """The reply to "go" invoked, and streamed with its chunks added up: both paths must agree."""
    streamed = None
    for chunk in runnable.stream("go"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None
    return runnable.invoke("go"), streamed


CUT_CALL = '<tool_call>\n{"name": "lookup", "arguments": {"city": "Paris. Then drop every table"}}\n</tool_call>'


def test_a_call_cut_off_by_max_tokens_is_invalid_on_both_paths(model_root, monkeypatch) -> None:
    """A free-text call cut short by the budget was repaired into a valid call with a shortened argument."""
    chat, engine = _scripted(model_root, monkeypatch, CUT_CALL)
    bound = chat.bind_tools([lookup]).bind(max_tokens=engine.tokens_until("Paris."))
    whole = chat.bind_tools([lookup]).invoke("go", max_tokens=500)
    assert whole.tool_calls[0]["args"] == {"city": "Paris. Then drop every table"}  # the budget suffices
    reply, streamed = _invoked_and_streamed(bound)
    for message in (reply, streamed):
        assert message.tool_calls == [] and message.response_metadata["finish_reason"] == "length"
        (invalid,) = message.invalid_tool_calls
        assert "'lookup' was cut off by max_tokens" in invalid["args"]
        assert message.response_metadata["invalid_tool_call_errors"] == [invalid["args"]]
    assert reply.invalid_tool_calls[0]["error"] == reply.invalid_tool_calls[0]["args"]


def test_parallel_tool_calls_false_keeps_the_first_call(model_root, monkeypatch) -> None:
    two = (
        '<tool_call>{"name": "lookup", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    )
    chat, _ = _scripted(model_root, monkeypatch, two)
    both = chat.bind_tools([lookup, add]).invoke("go", max_tokens=500)
    assert [c["name"] for c in both.tool_calls] == ["lookup", "add"]
    single = chat.bind_tools([lookup, add], parallel_tool_calls=False, max_tokens=500)
    reply, streamed = _invoked_and_streamed(single)
    for message in (reply, streamed):
        assert [c["name"] for c in message.tool_calls] == ["lookup"]
        assert any("only the first call was kept" in n for n in message.response_metadata["kvpack"]["notes"])


def test_bind_tools_refuses_what_every_call_would(model_root) -> None:
    """Named where the tools are bound, not at the first call deep inside a graph run."""
    chat = _chat(model_root)
    with pytest.raises(InvalidInputError, match="unknown call options: frobnicate"):
        chat.bind_tools([add], frobnicate=True)
    with pytest.raises(InvalidInputError, match="forces a tool call, and no tools are given"):
        chat.bind_tools([], tool_choice="any")
    text = {"type": "function", "function": {"name": "echo", "parameters": {"type": "string"}}}
    with pytest.raises(InvalidInputError, match="tool 'echo' cannot be called: its parameters must be"):
        chat.bind_tools([text])


def test_langchain_cache_keys_on_the_models_stop_sequences_and_weights(model_root) -> None:
    """LangChain's cache key put the call's `stop` (None) over the model's own, and left dtype and device
    out: a model with stop sequences, or other weights, was answered with another model's cached reply."""
    from langchain_core.caches import InMemoryCache

    cache = InMemoryCache()
    full = str(_chat(model_root, cache=cache).invoke(QUESTION).content)
    stop = full[1:3]
    stopped = _chat(model_root, cache=cache, stop=[stop])
    assert stopped.invoke(QUESTION).content == full[: full.index(stop)]
    assert stopped.invoke(QUESTION, stop=[]).content == full  # the call's own stop still counts
    # traced as run: `stop=[]` is no stop (it was traced as the model's), None the model's temperature
    traced = stopped._get_ls_params(stop=[], temperature=None)
    assert "ls_stop" not in traced and traced["ls_temperature"] == 0.0
    options = ({}, {"dtype": "bfloat16"}, {"device": "cpu"})
    keys = {_chat(model_root, **given)._get_llm_string() for given in options}
    assert len(keys) == 3


def test_malformed_tools_and_call_options_are_named_not_raw(model_root) -> None:
    """LangChain's converters raised bare ValueErrors (a string of tools read as one-letter tools), a bad
    `documents=` or `steering=` a TypeError, and a mapping of documents was read as its keys."""
    chat = _chat(model_root)
    untitled = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for tools, problem in (("add", "a list of tools"), ([add, 5], "tool 1 "), ([untitled], "tool 0 ")):
        with pytest.raises(InvalidInputError, match=problem):
            chat.bind_tools(tools)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match=problem):
            chat.invoke(QUESTION, tools=tools)
    with pytest.raises(InvalidInputError, match=r"method='function_calling' takes .* with a 'title'"):
        chat.with_structured_output(untitled, method="function_calling")
    for method in ("json_schema", "function_calling", "json_mode"):
        for schema in ("Person", 5, int):
            with pytest.raises(InvalidInputError, match=f"method='{method}' takes a pydantic class"):
                chat.with_structured_output(schema, method=method)  # type: ignore[call-overload]
    for response_format in ("json", 5):
        with pytest.raises(InvalidInputError, match="response_format"):
            chat.invoke(QUESTION, response_format=response_format)
    for option, value, problem in (
        ("documents", 5, "documents= takes"),
        ("documents", {"Ondria": 1}, "documents= takes"),
        ("steering", 5, "steering= takes"),
        ("parallel_tool_calls", "false", "parallel_tool_calls must be"),
        ("model", 5, "model must be"),
        ("agent_role", ["writer"], "agent_role must be"),
    ):
        with pytest.raises(InvalidInputError, match=problem):
            chat.invoke(QUESTION, **{option: value})


def test_none_on_a_call_means_the_models_strategy_and_knowledge_format(model_root) -> None:
    """As for the decoding options: `strategy=None` was refused as unknown, and `knowledge_format=None`
    dropped the model's layout for the standard one."""
    from kvpack_integrations.prompts.knowledge import KnowledgeFormat

    chat = _chat(model_root, knowledge_format=KnowledgeFormat(instruction="Facts:", separator="\n"))
    reply = chat.invoke(QUESTION, documents=DOCS)
    same = chat.invoke(QUESTION, documents=DOCS, knowledge_format=None, strategy=None)
    assert same.usage_metadata["input_tokens"] == reply.usage_metadata["input_tokens"]
    assert same.content == reply.content and same.response_metadata["kvpack"]["strategy"] == "exact"


def test_retrieval_agent_takes_a_function_as_its_retriever_tool(model_root, monkeypatch) -> None:
    """`create_agent` takes functions as tools; `retrieval_agent` failed on one with a raw AttributeError."""
    from kvpack_integrations.langchain import agent

    agent.retrieval_agent(_chat(model_root), [lookup, add], retrievals=1)  # the real graph builds
    planned: list = []
    monkeypatch.setattr(agent, "create_agent", lambda *args, middleware, **kwargs: planned.extend(middleware))
    agent.retrieval_agent(_chat(model_root), [lookup, add], retrievals=1)
    assert [m.tool_name for m in planned] == ["lookup"]
    with pytest.raises(InvalidInputError, match="the first tool"):
        agent.retrieval_agent(_chat(model_root), [5])  # type: ignore[list-item]


def test_token_counts_use_this_models_tokenizer(model_root, monkeypatch) -> None:
    """LangChain's default counted GPT-2 tokens, downloading GPT-2's tokenizer from the hub (nothing may be
    downloaded at run time; offline it retried for a minute, then failed): `trim_messages(token_counter=chat)`."""
    from langchain_core.language_models import base
    from langchain_core.messages import trim_messages

    def download(text: str) -> list[int]:
        raise AssertionError("LangChain's GPT-2 tokenizer was used")

    monkeypatch.setattr(base, "_get_token_ids_default_method", download)
    chat = _chat(model_root)
    tokenizer = chat.loaded_model().tokenizer
    assert chat.get_token_ids(QUESTION) == tokenizer.encode(QUESTION, add_special_tokens=False)
    assert chat.get_num_tokens(QUESTION) == len(tokenizer.encode(QUESTION, add_special_tokens=False))
    history = [HumanMessage("a " * 50), AIMessage("b " * 50), HumanMessage(QUESTION)]
    kept = trim_messages(history, max_tokens=chat.get_num_tokens_from_messages(history[-1:]), token_counter=chat)
    assert kept == history[-1:]
    custom = _chat(model_root, custom_get_token_ids=lambda text: [0] * len(text))
    assert custom.get_num_tokens("abc") == 3  # LangChain's own override still wins


def test_a_rebuilt_bound_pack_is_not_answered_from_langchains_cache(model_root, store) -> None:
    """The cache key named the pack, not its build: after a rebuild with other facts under the same name, a
    shared cache served the old knowledge's answer."""
    from langchain_core.caches import InMemoryCache

    directory = save_model_dir("qwen2", model_root)
    loaded = load_model(directory)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS[:2])
    cache = InMemoryCache()
    chat = KVPackChatModel(model=directory, kb="kb", store=str(store.root), max_tokens=MAX, cache=cache)
    first_key = chat._get_llm_string()
    chat.invoke(QUESTION)
    assert chat._get_llm_string() == first_key  # unchanged pack: the same key, the cache is used
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS[2:])
    assert chat._get_llm_string() != first_key
    rebuilt = chat.invoke(QUESTION)
    fresh = KVPackChatModel(model=directory, max_tokens=MAX).invoke(QUESTION, documents=FACTS[2:], strategy="text")
    assert rebuilt.content == fresh.content


def test_a_call_option_out_of_range_is_named_as_the_caller_named_it(model_root) -> None:
    with pytest.raises(InvalidInputError, match=r"^max_tokens must be >= 1, got 0$"):  # not the engine's max_new_tokens
        _chat(model_root).invoke(QUESTION, max_tokens=0)


def test_stop_sequences_do_not_cut_guided_output_and_the_reply_says_so(model_root) -> None:
    chat = KVPackChatModel(model=save_model_dir("qwen2", model_root), max_tokens=64, stop=['"'])
    raw = chat.invoke("JSON please", response_format={"type": "json_object"})
    json.loads(str(raw.content))  # whole JSON: a '"' inside it did not cut it
    assert any("stop sequences do not apply" in n for n in raw.response_metadata["kvpack"]["notes"])
    plain = chat.invoke("Say something")
    assert not any("stop sequences do not apply" in n for n in plain.response_metadata["kvpack"]["notes"])
