"""KVPackRetriever over a stored pack (packaged MiniLM embedder): ranking, k, handles, its tool, bad input."""

from __future__ import annotations

import pytest
from langchain_core.messages import ToolMessage

from kvpack_integrations import build_pack
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.errors import InvalidInputError, UnknownKnowledgeBaseError
from kvpack_integrations.langchain import KVPackRetriever
from kvpack_integrations.langchain.retriever import EMPTY_QUERY, NO_RESULTS
from kvpack_integrations.segments.handles import HANDLE_KEY, SegmentHandle

from .conftest import FACTS
from .support.tiny_models import make_model


@pytest.fixture
def retriever(store) -> KVPackRetriever:
    loaded = make_model("llama")
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "energy", FACTS)
    return KVPackRetriever(kb="energy", store=str(store.root), k=2)


def test_ranks_facts_and_carries_segment_handles(retriever: KVPackRetriever, store) -> None:
    docs = retriever.invoke("Who makes the Tessel-9 battery?")
    assert len(docs) == 2
    assert docs[0].page_content == FACTS[2]
    assert docs[0].metadata["score"] >= docs[1].metadata["score"]
    handle = SegmentHandle.from_dict(docs[0].metadata[HANDLE_KEY])
    manifest = store.manifest("energy")
    assert handle.pack == "energy" and handle.fact_index == 2
    assert handle.fingerprint == manifest.fingerprint.digest
    assert handle.segment_id == manifest.segment_ids[3]  # the instruction is segment 0
    assert len(retriever.invoke("drone", k=1)) == 1
    assert len(retriever.invoke("drone", k=10)) == len(FACTS)


async def test_async(retriever: KVPackRetriever) -> None:
    docs = await retriever.ainvoke("flight time of the drone", k=1)
    assert docs[0].page_content == FACTS[1]


def test_search_tool_returns_content_and_artifact(retriever: KVPackRetriever) -> None:
    tool = retriever.search_tool()
    call = {"name": tool.name, "args": {"query": "battery"}, "id": "c1", "type": "tool_call"}
    message = tool.invoke(call)
    assert isinstance(message, ToolMessage)
    assert message.content == "\n\n".join(d.page_content for d in message.artifact)
    assert all(HANDLE_KEY in d.metadata for d in message.artifact)
    assert NO_RESULTS.startswith("No")
    empty = tool.invoke({**call, "args": {"query": "  "}})
    assert empty.content == EMPTY_QUERY and empty.artifact == []


def test_bad_input(retriever: KVPackRetriever, store) -> None:
    with pytest.raises(UnknownKnowledgeBaseError, match="nope"):
        KVPackRetriever(kb="nope", store=str(store.root))
    with pytest.raises(InvalidInputError, match="query is empty"):
        retriever.invoke("  ")
    with pytest.raises(InvalidInputError, match="k must be a positive integer"):
        retriever.invoke("battery", k=0)
    with pytest.raises(ValueError):
        KVPackRetriever(kb="energy", store=str(store.root), k=0)


def test_options_of_the_other_backend_are_refused_not_ignored(store, tmp_path) -> None:
    """A pack retriever took Chroma's probes, lexical weight, host and port and searched without them."""
    for name, value in [("probes", 5), ("lexical_weight", 7.0), ("host", "nohost"), ("port", 1), ("chroma_path", "x")]:
        with pytest.raises(InvalidInputError, match=f"backend='pack' does not use {name}"):
            KVPackRetriever(kb="energy", store=str(store.root), **{name: value})
    with pytest.raises(InvalidInputError, match="backend='chroma' does not use store="):
        KVPackRetriever(kb="energy", store=str(store.root), backend="chroma", chroma_path=str(tmp_path))


def test_unknown_and_unused_options_are_refused_not_ignored(retriever: KVPackRetriever, store) -> None:
    """A typo (`search_kwargs=`, `top_k=`) or a call option other than `k` was silently dropped, `k=True`
    became one result, and the packet options (`model=`, `packet_store=` ...) did nothing under the default
    composition="exact"."""
    for name, value in [("search_kwargs", {"k": 1}), ("top_k", 1)]:
        with pytest.raises(InvalidInputError, match=f"unknown arguments: {name}"):
            KVPackRetriever(kb="energy", store=str(store.root), **{name: value})
    for name, value in [("k", True), ("k", "2"), ("probes", 2.0)]:
        with pytest.raises(InvalidInputError, match=f"{name} must be an integer"):
            KVPackRetriever(kb="energy", store=str(store.root), **{name: value})
    for name, value in [("model", "x"), ("packet_store", "p"), ("dtype", "float32")]:
        with pytest.raises(InvalidInputError, match=f"composition='exact' does not use {name}"):
            KVPackRetriever(kb="energy", store=str(store.root), **{name: value})
    with pytest.raises(InvalidInputError, match="unknown retrieval options: kk"):
        retriever.invoke("drone", kk=1)
    with pytest.raises(InvalidInputError, match="the retrieval query must be a string"):
        retriever.invoke(5)  # type: ignore[arg-type]


async def test_async_refuses_what_sync_refuses(retriever: KVPackRetriever) -> None:
    with pytest.raises(InvalidInputError, match="unknown retrieval options: kk"):
        await retriever.ainvoke("drone", kk=1)
