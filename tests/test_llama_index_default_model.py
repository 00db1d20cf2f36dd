"""Slow tier: the LlamaIndex integration on the embedded SmolLM2-135M-Instruct, real calls end to end.

`KVPackLLM()` with no arguments (complete, chat, stream, async), the query engine against LlamaIndex's
stock text `RetrieverQueryEngine` on the bundled demo knowledge (identical answers, fewer tokens
prefilled), and the planned agent (every step reuses the previous prompt, same run as text stuffing).
"""

from __future__ import annotations

import itertools
import json
from importlib import resources

import pytest
from llama_index.core.base.llms.types import ChatMessage, ToolCallBlock
from llama_index.core.memory import Memory
from llama_index.core.query_engine import RetrieverQueryEngine

from kvpack_integrations import PackStore, build_pack, load_model
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.llama_index import (
    KVPackLlamaRetriever,
    KVPackLLM,
    KVPackQueryEngine,
    record_usage,
    text_qa_template,
)
from kvpack_integrations.llama_index.agent import retrieval_agent
from kvpack_integrations.prompts.conversation import ChatTurn, render_conversation

pytestmark = pytest.mark.default_model

DEMO = resources.files("kvpack_integrations.demo")
QUESTIONS = [
    s["question"] for c in json.loads(DEMO.joinpath("questions.json").read_text())["chains"] for s in c["steps"]
]


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("store")
    loaded = load_model()
    facts = DEMO.joinpath("facts.txt").read_text().splitlines()
    build_pack(loaded, RadixTree(loaded.fingerprint), PackStore(root), "demo", facts)
    return str(root)


async def test_default_llm_complete_chat_stream_and_async() -> None:
    llm = KVPackLLM(max_tokens=24)
    meta = llm.metadata
    assert meta.model_name == "SmolLM2-135M-Instruct" and meta.context_window == llm.loaded_model().context_window
    assert meta.context_window >= 2048 and meta.is_chat_model and meta.is_function_calling_model
    question = "What is the capital of France?"
    completion = llm.complete(question)
    assert "Paris" in completion.text
    assert completion.raw["usage"]["prompt_tokens"] > 0 and completion.raw["kvpack"]["strategy"] == "exact"
    reply = llm.chat([ChatMessage(role="user", content=question)])
    assert reply.message.content == completion.text
    assert reply.raw["kvpack"]["cached_tokens"] == reply.raw["kvpack"]["input_tokens"] - 1  # remembered prompt
    assert "".join(c.delta or "" for c in llm.stream_complete(question)) == completion.text
    assert (await llm.acomplete(question)).text == completion.text
    assert [c async for c in await llm.astream_chat([ChatMessage(role="user", content=question)])][
        -1
    ].message.content == completion.text


def test_query_engine_matches_a_stock_text_query_engine(demo_store: str) -> None:
    retriever = KVPackLlamaRetriever("demo", store=demo_store, similarity_top_k=4, order="source")
    ours = KVPackQueryEngine(retriever, KVPackLLM(max_tokens=32))
    text_llm = KVPackLLM(max_tokens=32, strategy="text", remember=False)
    stock = RetrieverQueryEngine.from_args(retriever, llm=text_llm, text_qa_template=text_qa_template())
    with record_usage() as usage:
        pairs = [(stock.query(q).response, ours.query(q).response) for q in QUESTIONS]
    assert all(text == kv for text, kv in pairs), pairs
    assert "Tessel-9" in pairs[0][1]  # the knowledge really reaches the model
    text_reports, kv_reports = usage.reports[0::2], usage.reports[1::2]
    assert [r["input_tokens"] for r in text_reports] == [r["input_tokens"] for r in kv_reports]
    assert all(r["strategy"] == "exact" and r["exact"] for r in kv_reports)
    kv_prefill = sum(r["prefilled_tokens"] for r in kv_reports)
    assert kv_prefill < sum(r["prefilled_tokens"] for r in text_reports)
    # asked again (a follow-up on the same nodes), every prompt but its last token comes from cache
    with record_usage() as again:
        assert [ours.query(q).response for q in QUESTIONS[:2]] == [kv for _, kv in pairs[:2]]
    assert all(r["cached_tokens"] == r["input_tokens"] - 1 for r in again.reports)


async def _agent_run(store: str, strategy: str) -> tuple[list, list[dict]]:
    llm = KVPackLLM(kb="demo", store=store, max_tokens=40, strategy=strategy)
    retriever = KVPackLlamaRetriever("demo", store=store, similarity_top_k=2)
    agent = retrieval_agent(
        llm,
        retriever,
        retrievals=2,
        system_prompt="Search the knowledge base with a few keywords from the user's question, then answer.",
        answer_nudge="Now answer my original question in a few words.",
    )
    memory = Memory.from_defaults(session_id=f"agent-{strategy}")
    with record_usage() as usage:
        await agent.run(user_msg="Where is the maker of the Aurora X2's battery based?", memory=memory)
    steps = [
        (m.role.value, m.content, [(b.tool_name, b.tool_kwargs) for b in m.blocks if isinstance(b, ToolCallBlock)])
        for m in await memory.aget_all()
    ]
    return steps, usage.reports


async def test_agent_multi_step_reuses_the_conversation_prefix(demo_store: str) -> None:
    kv_steps, kv = await _agent_run(demo_store, "exact")
    text_steps, text = await _agent_run(demo_store, "text")
    assert kv_steps == text_steps
    assert [len(calls) for role, _, calls in kv_steps if role == "assistant"] == [1, 1, 0]
    assert all(isinstance(calls[0][1].get("query"), str) for role, _, calls in kv_steps[:4] if calls)
    assert len(kv) == 3
    for previous, step in itertools.pairwise(kv):
        assert step["cached_tokens"] >= previous["input_tokens"]  # the whole previous step came from cache
    # the bound pack opens the first prompt: everything up to the end of its last fact came from the store
    facts = PackStore(demo_store).manifest("demo").facts
    knowledge_end = render_conversation(
        load_model().tokenizer, [ChatTurn("user", "x")], knowledge=facts
    ).knowledge_tokens
    assert kv[0]["cached_tokens"] >= knowledge_end
    assert sum(r["prefilled_tokens"] for r in kv) < sum(r["prefilled_tokens"] for r in text) / 2
