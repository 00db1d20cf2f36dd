"""The LlamaIndex integration on tiny models: translation, metadata, chat/stream/async, nodes as segments
equal to a stock text `RetrieverQueryEngine`, tools and structured output, the planned agent, steering by
role, the retriever (pack and Chroma) and bad input."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import threading
from typing import Literal

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ImageBlock,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.memory import Memory
from llama_index.core.prompts import PromptTemplate
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode
from llama_index.core.tools import FunctionTool, ToolMetadata
from pydantic import BaseModel

from kvpack_integrations import build_pack, load_model
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.engine.chat import prepare
from kvpack_integrations.engine.registry import shared_engine
from kvpack_integrations.errors import (
    ContextTooLongError,
    CorruptSegmentError,
    FingerprintMismatchError,
    InvalidInputError,
    UnknownKnowledgeBaseError,
)
from kvpack_integrations.knowledge.knowledge_base import KnowledgeBase
from kvpack_integrations.llama_index import (
    KVPackLlamaRetriever,
    KVPackLLM,
    KVPackQueryEngine,
    KVPackSynthesizer,
    record_usage,
    text_qa_template,
)
from kvpack_integrations.llama_index.agent import EMPTY_QUERY, KVRetrievalTool, retrieval_agent
from kvpack_integrations.llama_index.messages import node_documents, to_turns
from kvpack_integrations.llama_index.retriever import FACT_KEY
from kvpack_integrations.prompts.conversation import ChatTurn, render_conversation
from kvpack_integrations.prompts.knowledge import KnowledgeFormat
from kvpack_integrations.segments.handles import HANDLE_KEY, SegmentHandle
from kvpack_integrations.segments.pack_store import PackStore
from kvpack_integrations.steering import build_steering_vector

from .conftest import FACTS, QUESTION
from .support.tiny_models import save_model_dir

MAX = 12
MORE_FACTS = [*FACTS, "Kelmark is a town on the coast of Ondria.", "Ilsa Varno founded Norhaven Labs in 2011."]
FORMAL = [("Certainly, I would be delighted to assist.", "yeah sure"), ("Kindly allow me to explain.", "ok so")]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def pack_store(tmp_path_factory: pytest.TempPathFactory, model_root) -> PackStore:
    """A pack of MORE_FACTS for the llama and qwen2 tiny models (one store per family)."""
    root = tmp_path_factory.mktemp("stores")
    for family in ("llama", "qwen2", "gemma", "mistral"):
        loaded = load_model(save_model_dir(family, model_root))
        build_pack(loaded, RadixTree(loaded.fingerprint), PackStore(root / family), "kb", MORE_FACTS)
    return PackStore(root)


def _store(pack_store: PackStore, family: str) -> str:
    return str(pack_store.root / family)


def _llm(model_root, family: str = "llama", **kwargs) -> KVPackLLM:
    return KVPackLLM(model=save_model_dir(family, model_root), max_tokens=kwargs.pop("max_tokens", MAX), **kwargs)


def _kvpack(response) -> dict:
    return response.raw["kvpack"]


def _packet_options(model_root, tmp_path, packets: str = "packets") -> dict[str, str]:
    """The tiny Llama, an untrained 2 + 2 adapter for it and a packet store: what a packet LLM and retriever share."""
    from kvpack_integrations.packet.adapter import PacketAdapter

    path = save_model_dir("llama", model_root)
    adapter = tmp_path / "adapter.safetensors"
    if not adapter.is_file():
        PacketAdapter.initial(load_model(path), 2, 2).save(adapter)
    return {"model": path, "packet_store": str(tmp_path / packets), "packet_adapter": str(adapter)}


def _packet_retriever(pack_store: PackStore, options: dict[str, str], **kwargs) -> KVPackLlamaRetriever:
    return KVPackLlamaRetriever(
        "kb", store=_store(pack_store, "llama"), similarity_top_k=2, composition="packet", **options, **kwargs
    )


# -- translation ---------------------------------------------------------------------------------------


def test_messages_translate_to_turns() -> None:
    call = ToolCallBlock(tool_call_id="c1", tool_name="search", tool_kwargs={"query": "battery"})
    openai_style = {"id": "c2", "type": "function", "function": {"name": "search", "arguments": '{"query": "drone"}'}}
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
        ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="Who makes"), TextBlock(text="the battery?")]),
        ChatMessage(role=MessageRole.ASSISTANT, blocks=[TextBlock(text=""), call]),
        ChatMessage(
            role=MessageRole.TOOL,
            blocks=[TextBlock(text=FACTS[2]), TextBlock(text=FACTS[1])],
            additional_kwargs={"tool_call_id": "c1"},
        ),
        ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={"tool_calls": [openai_style]}),
        ChatMessage(role="chatbot", content="Quill Energy."),
    ]
    turns = to_turns(messages)
    assert [t.role for t in turns] == ["system", "user", "assistant", "tool", "assistant", "assistant"]
    assert turns[1].content == "Who makes\nthe battery?" == messages[1].content
    assert turns[2].tool_calls[0].name == "search" and turns[2].tool_calls[0].arguments == {"query": "battery"}
    assert turns[3].content == messages[3].content and turns[3].documents == (FACTS[2], FACTS[1])
    assert turns[3].tool_call_id == "c1"
    assert turns[4].tool_calls[0].arguments == {"query": "drone"} and turns[4].tool_calls[0].id == "c2"
    with pytest.raises(InvalidInputError, match="'image' are not supported"):
        to_turns([ChatMessage(role="user", blocks=[ImageBlock(url="http://example.com/x.png")])])
    bad_args = ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_name="search", tool_kwargs="{not json")])
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        to_turns([bad_args])
    with pytest.raises(InvalidInputError, match="expected a llama_index ChatMessage"):
        to_turns(["hello"])  # type: ignore[list-item]


def test_nodes_translate_to_texts_and_handles() -> None:
    handle = SegmentHandle("/s", "kb", 2, "seg2", "abc", "m")
    hidden = TextNode(
        text=f"  {FACTS[2]}  ",
        metadata={HANDLE_KEY: handle.to_dict(), "page": 3},
        excluded_llm_metadata_keys=[HANDLE_KEY],
    )
    documents = node_documents([NodeWithScore(node=hidden, score=0.5), TextNode(text=" "), "plain text"])
    assert [d.text for d in documents] == [hidden.get_content(metadata_mode=MetadataMode.LLM).strip(), "plain text"]
    assert documents[0].text.startswith("page: 3") and documents[0].text.endswith(FACTS[2])  # visible metadata kept
    assert [d.handle for d in documents] == [handle, None]
    with pytest.raises(InvalidInputError, match=r"nodes\[0\].*handle lacks"):
        node_documents([TextNode(text="x", metadata={HANDLE_KEY: {"pack": "kb"}})])
    with pytest.raises(InvalidInputError, match=r"nodes\[0\] is a int"):
        node_documents([3])


# -- the LLM ---------------------------------------------------------------------------------------------


def test_metadata_and_options(model_root) -> None:
    llm = _llm(model_root)
    meta = llm.metadata
    assert meta.context_window == 2048 and meta.num_output == MAX  # the tiny models' max_position_embeddings
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name == llm.model and meta.system_role == MessageRole.SYSTEM
    assert _llm(model_root, context_window=512).metadata.context_window == 512
    assert KVPackLLM().model_name == "SmolLM2-135M-Instruct"  # no weights needed
    with pytest.raises(InvalidInputError, match="unknown arguments: temprature"):
        KVPackLLM(temprature=0.5)
    with pytest.raises(InvalidInputError, match="unknown call options: foo"):
        llm.chat([ChatMessage(role="user", content=QUESTION)], foo=1)
    with pytest.raises(InvalidInputError, match="pass the prompt unformatted"):
        llm.complete("Hi", formatted=True)
    with pytest.raises(UnknownKnowledgeBaseError, match="missing"):
        KVPackLLM(kb="missing", store="/nonexistent-kvpack-store")


def test_metadata_leaves_out_a_bound_packs_tokens(model_root, pack_store) -> None:
    """The bound pack opens every prompt: a synthesizer sizing its prompt must not count its tokens as free."""
    store = _store(pack_store, "llama")
    pack_tokens = PackStore(store).manifest("kb").token_count
    assert 0 < pack_tokens < 512
    assert _llm(model_root, kb="kb", store=store).metadata.context_window == 2048 - pack_tokens
    assert _llm(model_root, kb="kb", store=store, context_window=512).metadata.context_window == 512 - pack_tokens
    tight = _llm(model_root, kb="kb", store=store, context_window=pack_tokens + 2, max_tokens=8)
    assert tight.metadata.context_window == 2  # room for a query token and one new one: a call may ask that
    for window in (pack_tokens + 1, pack_tokens):  # no room for a query and its answer: named now
        full = _llm(model_root, kb="kb", store=store, context_window=window)
        with pytest.raises(ContextTooLongError, match=f"'kb' holds {pack_tokens} tokens: a {window}-token"):
            full.metadata  # noqa: B018


def test_per_call_options_are_checked_by_name(model_root) -> None:
    """Options are validated, not coerced: int("many") failed unnamed, 2.7 became 2 and True became 1."""
    llm = _llm(model_root)
    question = [ChatMessage(role="user", content=QUESTION)]
    bad = [
        ("max_tokens", "many"),
        ("max_tokens", 2.7),
        ("max_tokens", True),
        ("top_k", 1.5),
        ("temperature", "hot"),
        ("top_p", True),
        ("seed", "s"),
        ("seed", 1.5),
        ("stop", 3),
        ("stop", ["ok", 3]),
    ]
    for name, value in bad:
        with pytest.raises(InvalidInputError, match=f"^{name} must be"):
            llm.chat(question, **{name: value})
    reply = llm.chat(question, max_tokens=2, temperature=0, top_p=1, top_k=0, seed=1, stop="zz")
    assert _kvpack(reply)["output_tokens"] <= 2
    # named as the caller named it (the engine's name for it, max_new_tokens, was given)
    with pytest.raises(InvalidInputError, match=r"^max_tokens must be >= 1, got 0"):
        llm.chat(question, max_tokens=0)
    with pytest.raises(InvalidInputError, match=r"^unknown strategy \['x'\]"):  # failed unhashable, unnamed
        llm.chat(question, strategy=["x"])


def test_constructor_options_are_checked_as_a_calls_are() -> None:
    """Pydantic's lax mode coerced what a call refuses: max_tokens=True became 1, "5" 5, temperature=True
    1.0, seed=True 1; other values failed with pydantic's messages, not a call's."""
    bad = [
        ("max_tokens", True),
        ("max_tokens", "5"),
        ("max_tokens", 2.7),
        ("temperature", True),
        ("temperature", "0.5"),
        ("top_p", True),
        ("top_k", 1.5),
        ("seed", True),
        ("seed", "1"),
        ("stop", 3),
        ("stop", ["ok", 3]),
        ("context_window", True),
        ("context_window", "4096"),
    ]
    for name, value in bad:
        with pytest.raises(InvalidInputError, match=f"^{name} must be"):
            KVPackLLM(**{name: value})
    ranges = [
        ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("top_p", 0, "top_p must be in (0, 1]"),
        ("context_window", 0, "context_window must be >= 1"),
        ("remember", "yes", "remember must be True or False"),
        ("strict_segments", 1, "strict_segments must be True or False"),
        ("strategy", "bogus", "unknown strategy 'bogus'"),
        ("agent_role", "", "agent_role must be a non-empty string"),
    ]
    for name, value, message in ranges:
        with pytest.raises(InvalidInputError, match=re.escape(message)):
            KVPackLLM(**{name: value})
    llm = KVPackLLM(max_tokens=5, temperature=1, top_p=0.5, seed=3, stop="zz", context_window=512)
    assert (llm.max_tokens, llm.temperature, llm.top_p, llm.seed, llm.stop) == (5, 1.0, 0.5, 3, ["zz"])
    assert isinstance(llm.temperature, float) and llm.context_window == 512
    again = KVPackLLM.from_json(llm.to_json())  # what was stored loads back
    assert (again.max_tokens, again.temperature, again.stop) == (5, 1.0, ["zz"])


def test_prompt_hooks_are_refused_not_ignored() -> None:
    """Every prompt is rendered with the model's chat template: `completion_to_prompt=` and
    `messages_to_prompt=` were accepted and never called."""
    hooks = {
        "completion_to_prompt": lambda prompt: "ZZZ" + prompt,
        "messages_to_prompt": lambda messages: "ZZZ",
        "query_wrapper_prompt": PromptTemplate("ZZZ {query_str}"),
    }
    for name, hook in hooks.items():
        with pytest.raises(InvalidInputError, match=f"does not take {name}: .*chat template"):
            KVPackLLM(**{name: hook})
    defaults = KVPackLLM()  # LlamaIndex's own defaults, which the base class fills in, are no hook
    assert KVPackLLM(
        messages_to_prompt=defaults.messages_to_prompt, completion_to_prompt=defaults.completion_to_prompt
    ).model_name


def test_metadata_reads_the_config_not_the_weights(model_root, pack_store, tmp_path, monkeypatch) -> None:
    """An async agent reads `metadata` on its event loop at every step: reading it loaded the weights there."""
    import kvpack_integrations.llama_index.llm as llm_module

    source = save_model_dir("llama", model_root)
    wide = tmp_path / "wide"
    shutil.copytree(source, wide)
    config = json.loads((wide / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # not the tiny models' 2048: read from this very config
    (wide / "config.json").write_text(json.dumps(config))
    real_load = llm_module.load_model
    loads: list[str] = []

    def counted(model, **kwargs):
        loads.append(model)
        return real_load(model, **kwargs)

    monkeypatch.setattr(llm_module, "load_model", counted)
    llm = KVPackLLM(model=str(wide), max_tokens=4)
    assert llm.metadata.context_window == 4096 and loads == []
    assert llm.loaded_model().context_window == 4096 == llm.metadata.context_window and len(loads) == 1
    # a bound pack's tokens come from its manifest, read again when the pack is rebuilt
    copy = tmp_path / "store"
    shutil.copytree(_store(pack_store, "llama"), copy)
    bound, loads[:] = KVPackLLM(model=source, kb="kb", store=str(copy)), []
    before = PackStore(copy).manifest("kb").token_count
    assert bound.metadata.context_window == 2048 - before and loads == []
    loaded = real_load(source)
    build_pack(loaded, RadixTree(loaded.fingerprint), PackStore(copy), "kb", FACTS[:1])
    after = PackStore(copy).manifest("kb").token_count
    assert after < before and bound.metadata.context_window == 2048 - after and loads == []


def test_tool_calls_with_arguments_as_json_text() -> None:
    """A ToolCallBlock may hold its arguments as JSON text: they are parsed, not dropped as {}."""
    llm = KVPackLLM()  # nothing is generated: no weights needed

    def response(arguments: str) -> ChatResponse:
        call = ToolCallBlock(tool_call_id="c1", tool_name="add", tool_kwargs=arguments)
        return ChatResponse(message=ChatMessage(role="assistant", blocks=[call]))

    [call] = llm.get_tool_calls_from_response(response('{"a": 2, "b": 3}'))
    assert call.tool_kwargs == {"a": 2, "b": 3} and call.tool_id == "c1" and call.tool_name == "add"
    assert llm.get_tool_calls_from_response(response(""))[0].tool_kwargs == {}
    with pytest.raises(InvalidInputError, match=r"tool call 'add'.*not valid JSON"):
        llm.get_tool_calls_from_response(response("{not json"))
    with pytest.raises(InvalidInputError, match=r"tool call 'add'.*must be an object"):
        llm.get_tool_calls_from_response(response("[2, 3]"))


async def test_an_async_stream_stopped_early_closes_the_decoding(model_root) -> None:
    """`astream_chat` drives the engine's generator from worker threads; a consumer that stops early
    (break, then aclose) must close it, not leave it (and its cache) suspended until collected."""
    import inspect

    from kvpack_integrations.llama_index.llm import _in_threads

    responses = _llm(model_root)._run([ChatMessage(role="user", content=QUESTION)], {})  # what astream_chat drives
    stream = _in_threads(responses)
    first = await anext(stream)
    assert first.delta and inspect.getgeneratorstate(responses) == inspect.GEN_SUSPENDED
    await stream.aclose()
    assert inspect.getgeneratorstate(responses) == inspect.GEN_CLOSED


async def test_chat_complete_stream_and_async_agree(model_root) -> None:
    llm = _llm(model_root, "qwen2")
    messages = [ChatMessage(role="user", content=QUESTION)]
    reply = llm.chat(messages)
    assert reply.raw["usage"]["prompt_tokens"] == _kvpack(reply)["input_tokens"] > 0
    assert reply.raw["usage"]["completion_tokens"] == _kvpack(reply)["output_tokens"] > 0
    assert reply.additional_kwargs["prompt_tokens"] == _kvpack(reply)["input_tokens"]
    assert reply.raw["model"] == llm.loaded_model().name and reply.raw["finish_reason"] in ("stop", "length")
    chunks = list(llm.stream_chat(messages))
    assert "".join(c.delta or "" for c in chunks) == chunks[-1].message.content == reply.message.content
    assert len(chunks) > 2 and "kvpack" in chunks[-1].raw
    assert (await llm.achat(messages)).message.content == reply.message.content
    streamed = [c async for c in await llm.astream_chat(messages)]
    assert streamed[-1].message.content == reply.message.content
    # completion: the prompt is one user turn, so it equals the chat reply
    assert llm.complete(QUESTION).text == reply.message.content == (await llm.acomplete(QUESTION)).text
    assert "".join(c.delta or "" for c in llm.stream_complete(QUESTION)) == reply.message.content
    assert [c.text async for c in await llm.astream_complete(QUESTION)][-1] == reply.message.content
    # the second identical call reuses the whole remembered prompt but its last token
    again = llm.chat(messages)
    assert _kvpack(again)["cached_tokens"] == _kvpack(again)["input_tokens"] - 1
    assert again.additional_kwargs["cached_tokens"] == _kvpack(again)["cached_tokens"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "mistral"])
def test_nodes_as_segments_equal_text_stuffing(model_root, family: str) -> None:
    llm = _llm(model_root, family)
    question = [ChatMessage(role="user", content=QUESTION)]
    system = KnowledgeFormat().system_content(FACTS)
    text = llm.chat([ChatMessage(role="system", content=system), *question], strategy="text")
    kv = llm.chat(question, nodes=[TextNode(text=f) for f in FACTS])
    again = llm.chat(question, nodes=FACTS)
    assert kv.message.content == text.message.content == again.message.content
    assert _kvpack(text)["input_tokens"] == _kvpack(kv)["input_tokens"]
    assert _kvpack(again)["cached_tokens"] == _kvpack(again)["input_tokens"] - 1
    assert _kvpack(again)["strategy"] == "exact" and _kvpack(again)["exact"] is True


# -- the query engine ------------------------------------------------------------------------------------


def _prompt_ids(llm: KVPackLLM, messages, **kwargs) -> list[int]:
    """The token ids KVPackLLM renders for a call (what the model is sent)."""
    loaded = llm.loaded_model()
    request, _ = llm._request(messages, kwargs, loaded)
    engine = shared_engine(loaded)
    with engine.lock:
        return prepare(engine, request)[0].token_ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "mistral"])
def test_query_engine_equals_a_stock_text_query_engine(model_root, pack_store, family: str) -> None:
    store = _store(pack_store, family)
    retriever = KVPackLlamaRetriever("kb", store=store, similarity_top_k=3, order="source")
    ours = KVPackQueryEngine(retriever, _llm(model_root, family), system_prompt="Answer briefly.")
    text_llm = _llm(model_root, family, strategy="text", remember=False)
    template = ours.synthesizer.text_qa_template()
    stock = RetrieverQueryEngine.from_args(retriever, llm=text_llm, text_qa_template=template)
    questions = [QUESTION, "Where is Norhaven Labs?", "How long does the Aurora X2 fly?"]
    with record_usage() as usage:
        for q in questions:
            text_answer, kv_answer = stock.query(q), ours.query(q)
            assert kv_answer.response == text_answer.response
            assert [n.node.node_id for n in kv_answer.source_nodes] == [
                n.node.node_id for n in text_answer.source_nodes
            ]
    text_reports, kv_reports = usage.reports[0::2], usage.reports[1::2]
    assert [r["strategy"] for r in text_reports] == ["text"] * 3 and [r["strategy"] for r in kv_reports] == [
        "exact"
    ] * 3
    assert [r["input_tokens"] for r in text_reports] == [r["input_tokens"] for r in kv_reports]
    assert sum(r["prefilled_tokens"] for r in kv_reports) < sum(r["prefilled_tokens"] for r in text_reports)
    # token for token: the stock engine's messages render to exactly our prompt
    q = questions[0]
    nodes = retriever.retrieve(q)
    stock_messages = template.format_messages(
        context_str="\n\n".join(n.node.get_content(metadata_mode=MetadataMode.LLM) for n in nodes), query_str=q
    )
    ours_ids = _prompt_ids(ours.synthesizer._kvpack_llm, ours.synthesizer._messages(q), nodes=nodes)
    assert _prompt_ids(text_llm, stock_messages) == ours_ids
    # every fact retrieved, in pack order: the stored pack opens the prompt and is served from the store
    everything = KVPackLlamaRetriever("kb", store=store, similarity_top_k=len(MORE_FACTS), order="source")
    shared_engine(text_llm.loaded_model()).tree.clear()
    with record_usage() as usage:
        answer = KVPackQueryEngine(everything, ours.synthesizer._kvpack_llm).query(q).response
        assert (
            answer
            == RetrieverQueryEngine.from_args(everything, llm=text_llm, text_qa_template=text_qa_template())
            .query(q)
            .response
        )
    kv_report = usage.reports[0]
    assert any("loaded from" in n for n in kv_report["notes"])
    knowledge_end = render_conversation(
        text_llm.loaded_model().tokenizer, [ChatTurn("user", q)], knowledge=MORE_FACTS
    ).knowledge_tokens
    assert kv_report["cached_tokens"] >= knowledge_end


async def test_query_engine_async_streaming_and_repeat_reuse(model_root, pack_store) -> None:
    store = _store(pack_store, "llama")
    llm = _llm(model_root)
    retriever = KVPackLlamaRetriever("kb", store=store, similarity_top_k=2, order="source")
    plain = KVPackQueryEngine(retriever, llm)
    streaming = KVPackQueryEngine(retriever, llm, streaming=True)
    with record_usage() as usage:
        answer = plain.query(QUESTION)
        stock_class = RetrieverQueryEngine(retriever, response_synthesizer=KVPackSynthesizer(llm))  # usable as is
        assert stock_class.query(QUESTION).response == answer.response
        assert (await plain.aquery(QUESTION)).response == answer.response
        assert "".join(streaming.query(QUESTION).response_gen) == answer.response
        stream = await streaming.aquery(QUESTION)
        assert "".join([t async for t in stream.async_response_gen()]) == answer.response
    first, *repeats = usage.reports
    assert all(r["cached_tokens"] == r["input_tokens"] - 1 for r in repeats)  # the whole prompt came from cache
    assert first["input_tokens"] == repeats[0]["input_tokens"]


def test_stock_compact_template_and_synthesizer_rules(model_root) -> None:
    template = text_qa_template(system_prompt="Be brief.")
    system, user = template.format_messages(context_str="A\n\nB", query_str="Q?")
    assert system.content == f"{KnowledgeFormat().instruction}\n\nA\n\nB\n\nBe brief." and user.content == "Q?"
    with pytest.raises(InvalidInputError, match="no stock text twin"):
        text_qa_template(KnowledgeFormat(separator="\n"))
    from llama_index.core.llms import MockLLM

    with pytest.raises(InvalidInputError, match="needs a KVPackLLM, not MockLLM"):
        KVPackSynthesizer(MockLLM())
    synthesizer = KVPackSynthesizer(_llm(model_root))
    with pytest.raises(InvalidInputError, match="layout is fixed"):
        synthesizer.update_prompts({"text_qa_template": template})
    assert synthesizer.synthesize(QUESTION, []).response == "Empty Response"  # nothing retrieved: no call
    with pytest.raises(InvalidInputError, match="unknown synthesizer options: colour"):
        synthesizer.synthesize(QUESTION, [NodeWithScore(node=TextNode(text=FACTS[0]))], colour="red")
    # called directly with text chunks, the chunks are the documents
    direct = synthesizer.get_response(QUESTION, FACTS)
    assert direct == _llm(model_root).chat([ChatMessage(role="user", content=QUESTION)], nodes=FACTS).message.content


def test_synthesizer_options_are_checked_at_construction(model_root, pack_store) -> None:
    """`strategy=` and `agent_role=` of a synthesizer or query engine were checked only at the first query."""
    llm = _llm(model_root)
    retriever = KVPackLlamaRetriever("kb", store=_store(pack_store, "llama"), similarity_top_k=2)
    refused = [
        ({"strategy": "bogus"}, "unknown strategy 'bogus'"),
        ({"strategy": ["x"]}, r"unknown strategy \['x'\]"),
        ({"agent_role": ""}, "agent_role must be a non-empty string"),
        ({"agent_role": 3}, "agent_role must be a non-empty string"),
    ]
    for options, match in refused:
        with pytest.raises(InvalidInputError, match=match):
            KVPackSynthesizer(llm, **options)
        with pytest.raises(InvalidInputError, match=match):
            KVPackQueryEngine(retriever, llm, **options)


def test_query_engine_from_args_and_with_retriever(model_root, pack_store) -> None:
    """`from_args`, inherited from RetrieverQueryEngine, failed with a raw TypeError (response_synthesizer=);
    `with_retriever` gave a plain RetrieverQueryEngine."""
    from llama_index.core.response_synthesizers import get_response_synthesizer

    store = _store(pack_store, "llama")
    retriever = KVPackLlamaRetriever("kb", store=store, similarity_top_k=2, order="source")
    llm = _llm(model_root)
    engine = KVPackQueryEngine.from_args(retriever, llm=llm, strategy="text", response_mode="compact")
    assert isinstance(engine, KVPackQueryEngine) and engine.synthesizer._kvpack_llm is llm
    by_hand = KVPackQueryEngine(retriever, llm, strategy="text").query(QUESTION).response
    assert engine.query(QUESTION).response == by_hand
    streaming = KVPackQueryEngine.from_args(retriever, llm=llm, streaming=True, strategy="text")
    assert "".join(streaming.query(QUESTION).response_gen) == by_hand
    synthesizer = KVPackSynthesizer(llm, strategy="text")
    given = KVPackQueryEngine.from_args(retriever, response_synthesizer=synthesizer)
    assert given.synthesizer is synthesizer and given.query(QUESTION).response == by_hand
    other = KVPackLlamaRetriever("kb", store=store, similarity_top_k=1)
    moved = given.with_retriever(other)
    assert isinstance(moved, KVPackQueryEngine) and moved.synthesizer is synthesizer and moved.retriever is other
    refused = [
        ({"response_mode": "refine"}, "does not take response_mode: "),
        ({"text_qa_template": text_qa_template(), "output_cls": Drone}, "does not take output_cls, text_qa_template"),
        ({"colour": "red"}, "unknown arguments: colour"),
        ({"response_synthesizer": synthesizer, "strategy": "exact"}, "strategy beside a response_synthesizer"),
        (
            {"response_synthesizer": synthesizer, "llm": _llm(model_root, "qwen2")},
            "a response_synthesizer with another",
        ),
        (
            {"response_synthesizer": get_response_synthesizer(llm=llm)},
            "needs a KVPackSynthesizer, not CompactAndRefine",
        ),
    ]
    for options, match in refused:
        with pytest.raises(InvalidInputError, match=match):
            KVPackQueryEngine.from_args(retriever, **options)


def test_synthesizer_takes_the_llms_system_prompt_and_keeps_the_text_twin(model_root, pack_store) -> None:
    """A system_prompt on the KVPackLLM reaches the model (LlamaIndex's LLM.predict sends it on the stock
    path), and the synthesizer's text_qa_template() carries it, so the stock twin still sends the same tokens."""
    retriever = KVPackLlamaRetriever("kb", store=_store(pack_store, "llama"), similarity_top_k=2, order="source")
    nodes = retriever.retrieve(QUESTION)
    briefed = KVPackSynthesizer(_llm(model_root, system_prompt="Answer briefly."))
    given = KVPackSynthesizer(_llm(model_root), system_prompt="Answer briefly.")
    ids = _prompt_ids(briefed._kvpack_llm, briefed._messages(QUESTION), nodes=nodes)
    assert ids == _prompt_ids(given._kvpack_llm, given._messages(QUESTION), nodes=nodes)
    assert ids != _prompt_ids(given._kvpack_llm, [ChatMessage(role="user", content=QUESTION)], nodes=nodes)
    # the text twin: LlamaIndex's stock engine with the synthesizer's template, on an LLM without a system prompt
    template = briefed.text_qa_template()
    assert template.message_templates[0].content.endswith("Answer briefly.")
    text_llm = _llm(model_root, strategy="text", remember=False)
    context = "\n\n".join(n.node.get_content(metadata_mode=MetadataMode.LLM) for n in nodes)
    assert _prompt_ids(text_llm, template.format_messages(context_str=context, query_str=QUESTION)) == ids
    stock = RetrieverQueryEngine.from_args(retriever, llm=text_llm, text_qa_template=template)
    ours = KVPackQueryEngine(retriever, briefed._kvpack_llm)
    assert ours.query(QUESTION).response == stock.query(QUESTION).response
    # the same prompt on both is one prompt; two different ones are refused by name
    same = KVPackSynthesizer(_llm(model_root, system_prompt="Answer briefly."), system_prompt="Answer briefly.")
    assert _prompt_ids(same._kvpack_llm, same._messages(QUESTION), nodes=nodes) == ids
    with pytest.raises(InvalidInputError, match=r"system_prompt='Be thorough\.'.*system_prompt='Answer briefly\.'"):
        KVPackQueryEngine(retriever, _llm(model_root, system_prompt="Answer briefly."), system_prompt="Be thorough.")


def test_reading_prompts_never_raises(model_root) -> None:
    """get_prompts() is read-only: a layout without a stock text twin shows no template; only asking
    for that template explicitly raises."""
    llm = _llm(model_root)
    assert set(KVPackSynthesizer(llm).get_prompts()) == {"text_qa_template"}
    no_twin = KVPackSynthesizer(llm, knowledge_format=KnowledgeFormat(separator="\n"))
    assert no_twin.get_prompts() == {}
    with pytest.raises(InvalidInputError, match="no stock text twin"):
        no_twin.text_qa_template()


async def test_an_empty_answer_is_the_empty_response_streamed_or_not(model_root) -> None:
    """As LlamaIndex's BaseSynthesizer: `empty_response=` (default "Empty Response") answers when nothing
    was retrieved and when the model says nothing, whether the answer is streamed or not."""
    nodes = [NodeWithScore(node=TextNode(text=f)) for f in FACTS]
    said = "".join(KVPackSynthesizer(_llm(model_root), streaming=True).synthesize(QUESTION, nodes).response_gen)
    assert said and said != "Empty Response"
    quiet = _llm(model_root, stop=[said[0]])  # the answer is cut before its first character: nothing is said
    assert quiet.chat([ChatMessage(role="user", content=QUESTION)], nodes=FACTS).message.content == ""
    assert "".join(KVPackSynthesizer(quiet, streaming=True).synthesize(QUESTION, nodes).response_gen) == (
        "Empty Response"
    )
    for streaming in (False, True):
        synthesizer = KVPackSynthesizer(quiet, streaming=streaming, empty_response="(no answer)")
        for given in (nodes, []):  # the model said nothing; nothing was retrieved
            response = synthesizer.synthesize(QUESTION, given)
            assert ("".join(response.response_gen) if streaming else response.response) == "(no answer)"
            response = await synthesizer.asynthesize(QUESTION, given)
            if streaming:
                assert "".join([t async for t in response.async_response_gen()]) == "(no answer)"
            else:
                assert response.response == "(no answer)"


# -- bad segments ------------------------------------------------------------------------------------------


def _node(text: str, handle: SegmentHandle) -> NodeWithScore:
    return NodeWithScore(
        node=TextNode(text=text, metadata={HANDLE_KEY: handle.to_dict()}, excluded_llm_metadata_keys=[HANDLE_KEY])
    )


def test_nodes_from_another_model_or_a_missing_store(model_root, pack_store, tmp_path) -> None:
    llm, strict = _llm(model_root), _llm(model_root, strict_segments=True)
    question = [ChatMessage(role="user", content=QUESTION)]
    expected = llm.chat(question, nodes=FACTS[:2], strategy="text").message.content
    foreign = [
        _node(f, SegmentHandle("/elsewhere", "kb", i, "seg", "0123456789abcdef", "other-model"))
        for i, f in enumerate(FACTS[:2])
    ]
    reply = llm.chat(question, nodes=foreign)
    assert reply.message.content == expected
    assert any("other-model" in n and "computed on this model" in n for n in _kvpack(reply)["notes"])
    with pytest.raises(FingerprintMismatchError, match="other-model"):
        strict.chat(question, nodes=foreign)
    # a pack deleted from its store after retrieval: recomputed with a note, or refused when strict
    copy = tmp_path / "store"
    shutil.copytree(_store(pack_store, "llama"), copy)
    retriever = KVPackLlamaRetriever("kb", store=str(copy), similarity_top_k=2)
    nodes = retriever.retrieve(QUESTION)
    PackStore(copy).delete("kb")
    gone = llm.chat(question, nodes=nodes)
    assert (
        gone.message.content
        == llm.chat(question, nodes=[n.node.get_content() for n in nodes], strategy="text").message.content
    )
    assert any("no knowledge base named 'kb'" in n and "computed on this model" in n for n in _kvpack(gone)["notes"])
    with pytest.raises(UnknownKnowledgeBaseError, match="'kb'"):
        strict.chat(question, nodes=nodes)
    # a pack rebuilt with other facts: the nodes' segments are gone from it
    loaded = llm.loaded_model()
    build_pack(loaded, RadixTree(loaded.fingerprint), PackStore(copy), "kb", ["Something else entirely."])
    rebuilt = llm.chat(question, nodes=nodes)
    assert any("no longer in" in n and "rebuilt" in n for n in _kvpack(rebuilt)["notes"])
    with pytest.raises(CorruptSegmentError, match="rebuilt"):
        strict.chat(question, nodes=nodes)
    # under strict_segments the check holds for every strategy, not only where caches are reused
    with pytest.raises(CorruptSegmentError, match="rebuilt"):
        strict.chat(question, nodes=nodes, strategy="text")
    assert not any("rebuilt" in n for n in _kvpack(llm.chat(question, nodes=nodes, strategy="text"))["notes"])


def test_nodes_in_pack_order_open_the_pack_only_in_its_own_format(model_root, pack_store) -> None:
    """The stored pack is loaded when the nodes open the prompt in its layout, and not otherwise."""
    llm = _llm(model_root)
    engine = shared_engine(llm.loaded_model())
    nodes = KVPackLlamaRetriever("kb", store=_store(pack_store, "llama"), similarity_top_k=len(MORE_FACTS)).retrieve(
        QUESTION
    )
    nodes = sorted(nodes, key=lambda n: n.node.metadata[HANDLE_KEY]["fact_index"])
    pack_tokens = PackStore(_store(pack_store, "llama")).manifest("kb").token_count
    question = [ChatMessage(role="user", content=QUESTION)]
    engine.tree.clear()
    opened = _kvpack(llm.chat(question, nodes=nodes))
    assert any("that the documents open loaded from" in n for n in opened["notes"])
    assert opened["cached_tokens"] >= pack_tokens
    # another layout shares no knowledge tokens with the pack: loading it would only fill the tree
    engine.tree.clear()
    other = _kvpack(llm.chat(question, nodes=nodes, knowledge_format=KnowledgeFormat(instruction="Facts you may use:")))
    assert not any("loaded from" in n for n in other["notes"])
    assert other["cached_tokens"] == 0  # the tree was empty and nothing was loaded into it


# -- tools and structured output -------------------------------------------------------------------------


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def lookup(city: str) -> str:
    """Look up a city."""
    return f"{city} is a city."


class Drone(BaseModel):
    name: str
    flight_minutes: int


class Reading(BaseModel):
    """What random weights write whole: no free-text string (they seldom close one before max_tokens)."""

    flight_minutes: int
    maker: Literal["Norhaven Labs", "Quill Energy"]


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_forced_tool_calls_and_structured_output(model_root, family: str) -> None:
    llm = _llm(model_root, family, max_tokens=200)
    tools = [FunctionTool.from_defaults(add), FunctionTool.from_defaults(lookup)]
    response = llm.chat_with_tools(tools, user_msg="What is 2 + 3?", tool_choice="add")
    calls = llm.get_tool_calls_from_response(response)
    assert len(calls) == 1 and calls[0].tool_name == "add" and len(calls[0].tool_id) == 9
    assert isinstance(calls[0].tool_kwargs["a"], int) and isinstance(calls[0].tool_kwargs["b"], int)
    assert response.raw["finish_reason"] == "tool_calls"
    # the model picks the tool: a string argument runs until the model closes it or max_tokens ends
    # (random weights seldom close one), so the call is whole, or cut, refused and "length"
    required = llm.chat_with_tools(tools, user_msg="What is 2 + 3?", tool_required=True)
    if required.raw["finish_reason"] == "length":
        with pytest.raises(InvalidInputError, match="max_tokens ran out"):
            llm.get_tool_calls_from_response(required)
    else:
        assert required.raw["finish_reason"] == "tool_calls"
        assert llm.get_tool_calls_from_response(required)[0].tool_name in ("add", "lookup")
    out = llm.predict_and_call(tools, user_msg="What is 2 + 3?", tool_choice="add")  # the tool really runs
    arguments = out.sources[0].raw_input["kwargs"]
    assert out.sources[0].tool_name == "add" and out.response == str(arguments["a"] + arguments["b"])
    reading = llm.structured_predict(Reading, text_qa_template(), context_str=FACTS[1], query_str="Describe it.")
    assert isinstance(reading, Reading) and isinstance(reading.flight_minutes, int)
    # the next step, with the call and its result in the history, reuses the whole earlier prompt
    history = [ChatMessage(role="user", content="What is 2 + 3?"), response.message]
    history.append(ChatMessage(role="tool", content="5", additional_kwargs={"tool_call_id": calls[0].tool_id}))
    follow = llm.chat(history, tools=tools, tool_choice="none")
    assert _kvpack(follow)["cached_tokens"] >= _kvpack(response)["input_tokens"]
    # tools offered and the choice left to the model: the reply is parsed for calls, so it comes in one chunk
    assert len(list(llm.stream_chat_with_tools(tools, user_msg="What is 2 + 3?"))) == 1
    with pytest.raises(ValueError, match="without calling a tool"):
        llm.get_tool_calls_from_response(follow)
    with pytest.raises(InvalidInputError, match="tool_choice 'nope'"):
        llm.chat_with_tools(tools, user_msg="x", tool_choice="nope")


async def test_a_forced_call_cut_by_max_tokens_is_refused_not_run(model_root) -> None:
    """A forced call that max_tokens cut off was a valid call of placeholders ({"city": "", "nights": 0}):
    predict_and_call ran the tool with them and structured_predict returned them as the answer."""
    ran: list[tuple] = []

    def book(city: str, nights: int, guest_name: str) -> str:
        """Book a hotel."""
        ran.append((city, nights, guest_name))
        return "booked"

    tool = FunctionTool.from_defaults(book)
    llm = _llm(model_root, max_tokens=6)
    ask = "Book 3 nights in Kelmark for Ilsa Varno."
    cut = r"max_tokens ran out while the model wrote the call to 'book'.*raise max_tokens"
    responses = [
        llm.chat_with_tools([tool], user_msg=ask, tool_required=True),
        list(llm.stream_chat_with_tools([tool], user_msg=ask, tool_required=True))[-1],
        await llm.achat_with_tools([tool], user_msg=ask, tool_choice="book"),
    ]
    for response in responses:
        assert response.raw["finish_reason"] == "length"
        assert not any(isinstance(b, ToolCallBlock) for b in response.message.blocks)
        assert re.search(cut, response.additional_kwargs["invalid_tool_calls"][0])
        for error_on_no_tool_call in (True, False):  # an agent asks with False: it must not take it for an answer
            with pytest.raises(InvalidInputError, match=cut):
                llm.get_tool_calls_from_response(response, error_on_no_tool_call=error_on_no_tool_call)
    with pytest.raises(InvalidInputError, match=cut):
        llm.predict_and_call([tool], user_msg=ask, tool_required=True)
    with pytest.raises(InvalidInputError, match=cut):
        await llm.apredict_and_call([tool], user_msg=ask, tool_required=True)
    with pytest.raises(InvalidInputError, match=r"call to 'Drone'.*raise max_tokens"):
        llm.structured_predict(Drone, PromptTemplate("Describe the drone: {text}"), text=FACTS[1])
    assert ran == []


# -- the agent -------------------------------------------------------------------------------------------


class _Topic(BaseModel):
    query: Literal["battery maker", "drone flight time"]


class _TopicTool(KVRetrievalTool):
    """The retrieval tool with its query picked from a closed list: random weights seldom close a free-text
    string, and a forced call that max_tokens cuts is refused (`test_a_cut_forced_retrieval_stops_the_agent`)."""

    @property
    def metadata(self) -> ToolMetadata:
        return ToolMetadata(name=super().metadata.name, description=super().metadata.description, fn_schema=_Topic)


async def _run_agent(llm: KVPackLLM, store: str, streaming: bool) -> tuple[list, list[dict]]:
    """The messages the agent stored (role, text, calls) and the usage report of each model call."""
    retriever = KVPackLlamaRetriever("kb", store=store, similarity_top_k=1)
    agent = retrieval_agent(
        llm, [_TopicTool(retriever)], retrievals=2, streaming=streaming, system_prompt="Search, then answer."
    )
    memory = Memory.from_defaults(session_id=f"test-{streaming}")
    with record_usage() as usage:
        await agent.run(user_msg=QUESTION, memory=memory)
    messages = await memory.aget_all()
    steps = [
        (m.role.value, m.content, [(b.tool_name, b.tool_kwargs) for b in m.blocks if isinstance(b, ToolCallBlock)])
        for m in messages
    ]
    return steps, usage.reports


@pytest.mark.parametrize("family", ["llama", "qwen2"])
async def test_agent_equals_text_stuffing_and_prefills_only_new_tokens(model_root, pack_store, family: str) -> None:
    store = _store(pack_store, family)
    kv_steps, kv = await _run_agent(_llm(model_root, family, max_tokens=40), store, streaming=False)
    text_steps, text = await _run_agent(_llm(model_root, family, max_tokens=40, strategy="text"), store, streaming=True)
    assert kv_steps == text_steps
    assert [role for role, _, _ in kv_steps] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert [len(calls) for role, _, calls in kv_steps if role == "assistant"] == [1, 1, 0]  # 2 retrievals, answer
    assert kv_steps[2][1] in MORE_FACTS or kv_steps[2][1] == EMPTY_QUERY  # the tool turn: the retrieved fact
    assert len(kv) == len(text) == 3
    for previous, step in itertools.pairwise(kv):
        assert step["cached_tokens"] >= previous["input_tokens"]  # the whole earlier prompt reused
    assert sum(r["prefilled_tokens"] for r in kv) < sum(r["prefilled_tokens"] for r in text) / 2


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_cut_forced_retrieval_stops_the_agent(model_root, pack_store, streaming: bool) -> None:
    """The planned retrieval is a forced call: cut by max_tokens, it is refused, not run with a cut query."""
    retriever = KVPackLlamaRetriever("kb", store=_store(pack_store, "llama"), similarity_top_k=1)
    agent = retrieval_agent(_llm(model_root, max_tokens=12), retriever, retrievals=1, streaming=streaming)
    with pytest.raises(InvalidInputError, match=r"call to 'search_knowledge'.*raise max_tokens"):
        await agent.run(user_msg=QUESTION, memory=Memory.from_defaults(session_id=f"cut-{streaming}"))


async def test_an_async_agent_loads_no_weights_on_its_event_loop(model_root, pack_store, monkeypatch) -> None:
    """FunctionAgent reads `llm.metadata` on the event loop at every step, which loaded the weights there
    (stalling every other task for the whole load); the engine runs on worker threads."""
    import kvpack_integrations.llama_index.llm as llm_module

    loop_thread, real_load = threading.current_thread(), llm_module.load_model
    on_loop: list[str] = []

    def watched(model, **kwargs):
        if threading.current_thread() is loop_thread:
            on_loop.append(model)
        return real_load(model, **kwargs)

    monkeypatch.setattr(llm_module, "load_model", watched)
    retriever = KVPackLlamaRetriever("kb", store=_store(pack_store, "llama"), similarity_top_k=1)
    for streaming in (False, True):
        agent = retrieval_agent(_llm(model_root, max_tokens=48), [_TopicTool(retriever)], streaming=streaming)
        with record_usage() as usage:
            await agent.run(user_msg=QUESTION, memory=Memory.from_defaults(session_id=f"loop-{streaming}"))
        assert len(usage.reports) == 3 and on_loop == []  # two retrievals and the answer, none loaded on the loop


def test_retrieval_tool_and_agent_validation(model_root, pack_store) -> None:
    retriever = KVPackLlamaRetriever("kb", store=_store(pack_store, "llama"), similarity_top_k=2)
    tool = KVRetrievalTool(retriever)
    output = tool.call(query="Who makes the battery?")
    assert [b.text for b in output.blocks] == [n.node.text for n in output.raw_output]
    assert output.content == "\n".join(n.node.text for n in output.raw_output)
    assert tool.call(query="  ").content == EMPTY_QUERY
    assert tool.metadata.to_openai_tool()["function"]["parameters"]["required"] == ["query"]
    with pytest.raises(InvalidInputError, match="at least one tool"):
        retrieval_agent(_llm(model_root), [])
    with pytest.raises(InvalidInputError, match="retrievals must be"):
        retrieval_agent(_llm(model_root), retriever, retrievals=-1)


# -- steering --------------------------------------------------------------------------------------------


def test_steering_per_llm_call_role_and_query_engine(model_root, pack_store) -> None:
    llm = _llm(model_root, max_tokens=8)
    formal = build_steering_vector(llm.loaded_model(), FORMAL, layers="all", alpha=0.5, name="formal", progress=False)
    question = [ChatMessage(role="user", content="Describe the drone.")]
    plain = llm.chat(question)
    direct = llm.chat(question, steering=formal)
    assert _kvpack(plain)["steering"] == [] and _kvpack(direct)["steering"] == ["formal:0.5"]
    assert _kvpack(direct)["exact"] is False and direct.message.content != plain.message.content
    roles = KVPackLLM(model=llm.model, max_tokens=8, roles={"writer": formal, "critic": []})
    writer = roles.for_role("writer")
    assert writer.chat(question).message.content == direct.message.content
    assert roles.chat(question, agent_role="writer").message.content == direct.message.content
    assert (
        KVPackLLM(model=llm.model, max_tokens=8, steering=[formal]).chat(question).message.content
        == direct.message.content
    )
    critic = roles.for_role("critic").chat(question)
    assert critic.message.content == plain.message.content
    assert any("role 'critic' has no steering vector" in n for n in _kvpack(critic)["notes"])
    # steering selected per query engine; the unsteered engine shares the weights and the prefix tree
    retriever = KVPackLlamaRetriever("kb", store=_store(pack_store, "llama"), similarity_top_k=2)
    with record_usage() as usage:
        KVPackQueryEngine(retriever, llm, steering=[formal]).query(QUESTION)
        KVPackQueryEngine(retriever, roles, agent_role="writer").query(QUESTION)
        KVPackQueryEngine(retriever, llm).query(QUESTION)
    assert [r["steering"] for r in usage.reports] == [["formal:0.5"], ["formal:0.5"], []]
    with pytest.raises(InvalidInputError, match="SteeringVector"):
        KVPackLLM(steering=["formal"])
    with pytest.raises(InvalidInputError, match="role names"):
        KVPackLLM(roles={"": formal})
    with pytest.raises(InvalidInputError, match="agent_role must be"):
        llm.for_role("")


async def test_two_agent_roles_share_one_model_one_knowledge_base_and_the_prefix(model_root, pack_store) -> None:
    """A researcher (unsteered) retrieves and answers; a writer (steered) continues the same conversation."""
    llm = _llm(model_root, max_tokens=48)  # room for the whole forced retrieval call
    formal = build_steering_vector(llm.loaded_model(), FORMAL, layers="all", alpha=0.5, name="formal", progress=False)
    team = KVPackLLM(model=llm.model, max_tokens=48, roles={"writer": formal})
    tools = [_TopicTool(KVPackLlamaRetriever("kb", store=_store(pack_store, "llama"), similarity_top_k=1))]
    researcher = retrieval_agent(team.for_role("researcher"), tools, retrievals=1, name="researcher")
    writer = retrieval_agent(team.for_role("writer"), tools, retrievals=0, name="writer")
    memory = Memory.from_defaults(session_id="two-roles")
    with record_usage() as usage:
        await researcher.run(user_msg=QUESTION, memory=memory)
        await writer.run(user_msg="Say it again, formally.", memory=memory)
    reports = usage.reports
    assert [r["steering"] for r in reports] == [[], [], ["formal:0.5"]]  # retrieval, answer; the writer's answer
    assert [r["exact"] for r in reports] == [True, True, False]
    assert any("role 'researcher' has no steering vector" in n for n in reports[0]["notes"])
    # the writer's prompt extends the researcher's conversation: its whole last prompt comes from cache
    assert reports[2]["cached_tokens"] >= reports[1]["input_tokens"]
    roles = [m.role.value for m in await memory.aget_all()]
    assert roles == ["user", "assistant", "tool", "assistant", "user", "assistant"]


# -- the retriever ---------------------------------------------------------------------------------------


def test_pack_retriever_nodes_carry_handles(pack_store) -> None:
    store = _store(pack_store, "llama")
    retriever = KVPackLlamaRetriever("kb", store=store, similarity_top_k=3)
    hits = retriever.retrieve("Who makes the Tessel-9 battery?")
    assert len(hits) == 3 and hits[0].node.get_content() == FACTS[2]
    assert hits[0].score >= hits[1].score >= hits[2].score
    manifest = PackStore(store).manifest("kb")
    handle = SegmentHandle.from_dict(hits[0].node.metadata[HANDLE_KEY])
    assert handle.pack == "kb" and handle.fact_index == 2 and handle.fingerprint == manifest.fingerprint.digest
    assert handle.segment_id in manifest.segment_ids and hits[0].node.node_id == handle.segment_id
    assert hits[0].node.get_content(metadata_mode=MetadataMode.LLM) == FACTS[2]  # no metadata header
    ordered = KVPackLlamaRetriever("kb", store=store, similarity_top_k=3, order="source").retrieve(
        "Who makes the Tessel-9 battery?"
    )
    assert sorted(h.node.node_id for h in ordered) == sorted(h.node.node_id for h in hits)
    indexes = [SegmentHandle.from_dict(h.node.metadata[HANDLE_KEY]).fact_index for h in ordered]
    assert indexes == sorted(indexes)
    with pytest.raises(UnknownKnowledgeBaseError, match="nope"):
        KVPackLlamaRetriever("nope", store=store)
    with pytest.raises(InvalidInputError, match="query is empty"):
        retriever.retrieve("  ")
    with pytest.raises(InvalidInputError, match="k must be a positive integer"):
        KVPackLlamaRetriever("kb", store=store, similarity_top_k=0)
    with pytest.raises(InvalidInputError, match="unknown order"):
        KVPackLlamaRetriever("kb", store=store, order="random")  # type: ignore[arg-type]


def test_retriever_arguments_are_checked_at_construction(pack_store, tmp_path) -> None:
    """A misspelt argument failed with a raw TypeError; the Chroma backend's options were ignored by a pack."""
    store = _store(pack_store, "llama")
    with pytest.raises(InvalidInputError, match="unknown arguments: simlarity_top_k"):
        KVPackLlamaRetriever("kb", store=store, simlarity_top_k=2)
    chroma_only = {"probes": 2, "lexical_weight": 0.0, "host": "localhost", "port": 8001, "chroma_path": str(tmp_path)}
    for name, value in chroma_only.items():
        with pytest.raises(
            InvalidInputError, match=f"^backend='pack' does not use {name}: options of backend='chroma'"
        ):
            KVPackLlamaRetriever("kb", store=store, **{name: value})
    with pytest.raises(InvalidInputError, match="backend='chroma' does not use store="):
        KVPackLlamaRetriever("kb", store=store, backend="chroma", chroma_path=str(tmp_path))
    assert KVPackLlamaRetriever("kb", store=store, verbose=True).retrieve(QUESTION)  # BaseRetriever's own options


def test_the_retriever_searches_a_bundles_embedding_strings(pack_store, tmp_path) -> None:
    """`QueryBundle.custom_embedding_strs` (a HyDE transform's hypothetical answer, say) were ignored: the
    query string was searched instead, on both backends."""
    KnowledgeBase("facts", tmp_path / "kb").add(MORE_FACTS, progress=False)
    retrievers = [
        KVPackLlamaRetriever("kb", store=_store(pack_store, "llama"), similarity_top_k=1),
        KVPackLlamaRetriever("facts", backend="chroma", chroma_path=str(tmp_path / "kb"), similarity_top_k=1),
    ]
    for retriever in retrievers:
        assert retriever.retrieve("Who founded the lab?")[0].node.text == MORE_FACTS[-1]
        custom = QueryBundle(query_str="Who founded the lab?", custom_embedding_strs=["Quill Energy's battery"])
        assert retriever.retrieve(custom)[0].node.text == FACTS[2]
        several = QueryBundle(query_str="x", custom_embedding_strs=["Which battery?", "Quill Energy"])
        joined = retriever.retrieve("Which battery?\nQuill Energy")  # the strings are searched together
        assert [n.node.node_id for n in retriever.retrieve(several)] == [n.node.node_id for n in joined]
        with pytest.raises(InvalidInputError, match="custom_embedding_strs must be a list of strings"):
            retriever.retrieve(QueryBundle(query_str="x", custom_embedding_strs="Quill Energy"))  # type: ignore[arg-type]


async def test_chroma_retriever_feeds_the_query_engine(model_root, tmp_path) -> None:
    KnowledgeBase("facts", tmp_path / "kb").add(MORE_FACTS, progress=False)
    retriever = KVPackLlamaRetriever("facts", backend="chroma", chroma_path=str(tmp_path / "kb"), similarity_top_k=2)
    hits = await retriever.aretrieve("Who makes the Tessel-9 battery?")
    assert hits[0].node.get_content(metadata_mode=MetadataMode.LLM) == FACTS[2]
    assert hits[0].node.metadata[FACT_KEY]["kb"] == "facts" and "similarity" in hits[0].node.metadata
    # in source order the hits follow the facts' insertion order, whatever their ids
    in_order = KVPackLlamaRetriever(
        "facts", backend="chroma", chroma_path=str(tmp_path / "kb"), similarity_top_k=4, order="source"
    ).retrieve("Who makes the Tessel-9 battery and where is Norhaven Labs?")
    positions = [h.node.metadata[FACT_KEY]["position"] for h in in_order]
    assert positions == sorted(positions) and len(set(positions)) == 4
    assert [h.node.get_content() for h in in_order] == [MORE_FACTS[p] for p in positions]
    llm = _llm(model_root)
    stock = RetrieverQueryEngine.from_args(
        retriever, llm=_llm(model_root, strategy="text"), text_qa_template=text_qa_template()
    )
    assert KVPackQueryEngine(retriever, llm).query(QUESTION).response == stock.query(QUESTION).response
    with pytest.raises(UnknownKnowledgeBaseError, match="other"):
        KVPackLlamaRetriever("other", backend="chroma", chroma_path=str(tmp_path / "kb"))


def test_packet_strategy_through_the_query_engine(model_root, pack_store, tmp_path) -> None:
    from kvpack_integrations.llama_index.retriever import PACKET_KEY

    options = _packet_options(model_root, tmp_path)
    retriever = _packet_retriever(pack_store, options)
    hits = retriever.retrieve(QUESTION)
    assert (
        hits[0].node.metadata[PACKET_KEY]["composition"] == "packet" and hits[0].node.metadata[PACKET_KEY]["built_now"]
    )
    assert PACKET_KEY not in hits[0].node.get_content(metadata_mode=MetadataMode.LLM)
    llm = KVPackLLM(max_tokens=6, **options)
    with record_usage() as usage:
        KVPackQueryEngine(retriever, llm, strategy="packet").query(QUESTION)
        KVPackQueryEngine(retriever, llm).query(QUESTION)
    packet, exact = usage.reports
    assert packet["strategy"] == "packet" and packet["exact"] is False
    assert any("nothing recomputed" in n for n in packet["notes"]) and not any(
        "cached now" in n for n in packet["notes"]
    )
    assert exact["strategy"] == "exact" and exact["exact"] is True


async def test_query_engine_response_says_when_the_answer_is_approximate(model_root, pack_store, tmp_path) -> None:
    """The usage report of a non-streaming query (strategy, exact, notes) is in Response.metadata["kvpack"],
    so a packet or blend answer is marked approximate where it is read; the LLM reply says it too."""
    options = _packet_options(model_root, tmp_path)
    llm = KVPackLLM(max_tokens=6, **options)
    store = _store(pack_store, "llama")
    for strategy in ("packet", "blend"):
        retriever = KVPackLlamaRetriever("kb", store=store, similarity_top_k=2, composition=strategy, **options)
        engine = KVPackQueryEngine(retriever, llm, strategy=strategy)
        for response in (engine.query(QUESTION), await engine.aquery(QUESTION)):
            report = response.metadata["kvpack"]
            assert report["strategy"] == strategy and report["exact"] is False and isinstance(report["notes"], list)
            assert all(n.node.node_id in response.metadata for n in response.source_nodes)  # node metadata kept
        reply = llm.chat([ChatMessage(role="user", content=QUESTION)], nodes=FACTS, strategy=strategy)
        assert reply.additional_kwargs["strategy"] == strategy and reply.additional_kwargs["exact"] is False
    exact = KVPackQueryEngine(retriever, llm).query(QUESTION).metadata["kvpack"]
    assert exact["strategy"] == "exact" and exact["exact"] is True


def test_query_engine_from_kb_stores_packets_for_a_packet_strategy(model_root, pack_store, tmp_path) -> None:
    """With strategy packet or blend (the engine's, else the LLM's) from_kb's retriever stores the packets at
    retrieval, so the query composes them instead of building them."""
    options = _packet_options(model_root, tmp_path)
    store = _store(pack_store, "llama")
    llm = KVPackLLM(max_tokens=6, **options)
    engine = KVPackQueryEngine.from_kb("kb", store=store, llm=llm, similarity_top_k=2, strategy="packet")
    assert engine.retriever.composition == "packet"
    blend = KVPackLLM(max_tokens=6, strategy="blend", **options)
    assert KVPackQueryEngine.from_kb("kb", store=store, llm=blend).retriever.composition == "blend"
    assert KVPackQueryEngine.from_kb("kb", store=store, llm=llm).retriever.composition == "exact"
    told = KVPackQueryEngine.from_kb(
        "kb", store=store, llm=llm, strategy="packet", retriever_options={"composition": "exact"}
    )
    assert told.retriever.composition == "exact"
    with record_usage() as usage:
        engine.query(QUESTION)
    [report] = usage.reports
    assert report["strategy"] == "packet" and not any("cached now" in n for n in report["notes"]), report["notes"]


def test_packets_stored_at_retrieval_follow_the_knowledge_format(model_root, pack_store, tmp_path) -> None:
    """Packets depend on how the format lays documents out: built in the LLM's format, they are reused."""
    fmt = KnowledgeFormat(instruction="Facts you may use:", separator="\n")
    question = [ChatMessage(role="user", content=QUESTION)]
    for retrieval_format, cached_now in ((None, True), (fmt, False)):
        options = _packet_options(model_root, tmp_path, packets=f"packets-{cached_now}")
        nodes = _packet_retriever(pack_store, options, knowledge_format=retrieval_format).retrieve(QUESTION)
        llm = KVPackLLM(max_tokens=4, strategy="packet", **options)
        notes = _kvpack(llm.chat(question, nodes=nodes, knowledge_format=fmt))["notes"]
        assert any("cached now" in n for n in notes) is cached_now, notes


def test_query_engine_from_kb_gives_the_retriever_the_llms_model(model_root, pack_store) -> None:
    llm = _llm(model_root, packet_store="/tmp/kvpack-test-packets-unused")
    engine = KVPackQueryEngine.from_kb("kb", store=_store(pack_store, "llama"), llm=llm, similarity_top_k=3)
    retriever = engine.retriever
    assert isinstance(retriever, KVPackLlamaRetriever) and retriever.order == "source"
    assert (retriever.model, retriever.device, retriever.dtype) == (llm.model, llm.device, llm.dtype)
    assert retriever.packet_store == llm.packet_store
    by_hand = KVPackQueryEngine(
        KVPackLlamaRetriever("kb", store=_store(pack_store, "llama"), similarity_top_k=3, order="source"), llm
    )
    assert engine.query(QUESTION).response == by_hand.query(QUESTION).response
    override = KVPackQueryEngine.from_kb(
        "kb", store=_store(pack_store, "llama"), llm=llm, retriever_options={"packet_store": None}
    )
    assert override.retriever.packet_store is None


def test_no_parallel_tool_calls_holds_when_streaming(model_root, monkeypatch) -> None:
    """`allow_parallel_tool_calls=False` keeps the first call on every path: FunctionAgent streams by
    default, and only the non-streaming path used to trim. The engine is replaced by a reply holding two
    calls (a tiny random model does not write two valid ones); the trimming under test is the LLM's."""
    import asyncio

    import kvpack_integrations.llama_index.llm as llm_module
    from kvpack_integrations.engine.chat import ChatDelta, ChatReply
    from kvpack_integrations.engine.tool_calls import ParsedToolCall
    from kvpack_integrations.engine.usage import Usage

    def two_calls(engine, request):
        calls = [ParsedToolCall("search", {"query": q}, q * 9) for q in "ab"]
        yield ChatDelta("", ChatReply("", calls, [], Usage(5, 0, 5), "tool_calls"))

    def search(query: str) -> str:
        """search"""
        return query

    monkeypatch.setattr(llm_module, "stream_chat", two_calls)
    tool = FunctionTool.from_defaults(search)
    llm = _llm(model_root)

    def n(response) -> int:
        return len(llm.get_tool_calls_from_response(response, error_on_no_tool_call=False))

    for parallel, want in ((False, 1), (True, 2)):
        assert n(llm.chat_with_tools([tool], "q", allow_parallel_tool_calls=parallel)) == want
        assert n(list(llm.stream_chat_with_tools([tool], "q", allow_parallel_tool_calls=parallel))[-1]) == want

        async def streamed(parallel: bool = parallel):
            return [
                r async for r in await llm.astream_chat_with_tools([tool], "q", allow_parallel_tool_calls=parallel)
            ][-1]

        assert n(asyncio.run(streamed())) == want
