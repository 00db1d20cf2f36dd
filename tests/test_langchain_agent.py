"""A real `create_agent` loop: forced retrievals then an answer, identical to text stuffing, new tokens only."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import BaseModel

from kvpack_integrations import build_pack, load_model
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.errors import InvalidInputError
from kvpack_integrations.langchain import KVPackChatModel, KVPackRetriever
from kvpack_integrations.langchain.agent import RetrievalPlan, retrieval_agent

from .conftest import FACTS, QUESTION
from .support.tiny_models import save_model_dir

EXAMPLE = Path(__file__).resolve().parents[1] / "notebooks" / "langchain_agent.py"


def _trajectory(messages) -> list:
    return [(m.type, m.text, [(c["name"], c["args"]) for c in getattr(m, "tool_calls", [])]) for m in messages]


class _Topic(BaseModel):
    query: Literal["battery maker", "drone flight time"]


def _agent(directory: str, store, strategy: str):
    chat = KVPackChatModel(model=directory, kb="kb", store=str(store.root), max_tokens=48, strategy=strategy)
    tool = KVPackRetriever(kb="kb", store=str(store.root), k=1).search_tool()
    # the query from a closed list: random weights seldom close a free-text string, and a forced call that
    # max_tokens cuts is no call (an invalid one), so a free query would end the plan at its first step
    tool.args_schema = _Topic
    return retrieval_agent(chat, [tool], retrievals=2, answer_nudge="Answer now.")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
async def test_agent_loop_equals_text_stuffing_and_prefills_only_new_tokens(tmp_path, store, family: str) -> None:
    directory = save_model_dir(family, tmp_path)
    loaded = load_model(directory)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)
    kv = (await _agent(directory, store, "exact").ainvoke({"messages": [HumanMessage(QUESTION)]}))["messages"]
    text = _agent(directory, store, "text").invoke({"messages": [HumanMessage(QUESTION)]})["messages"]
    assert _trajectory(kv) == _trajectory(text)
    steps = [m for m in kv if isinstance(m, AIMessage)]
    assert [len(m.tool_calls) for m in steps] == [1, 1, 0]  # two forced retrievals, then the answer
    for previous, step in itertools.pairwise(steps):
        before = previous.response_metadata["kvpack"]["input_tokens"]
        assert step.response_metadata["kvpack"]["cached_tokens"] >= before  # the whole earlier prompt reused
    kv_prefill = sum(m.response_metadata["kvpack"]["prefilled_tokens"] for m in steps)
    text_prefill = sum(m.response_metadata["kvpack"]["prefilled_tokens"] for m in text if isinstance(m, AIMessage))
    assert kv_prefill < text_prefill / 2


def test_plan_validation() -> None:
    for bad in (-1, "2", 1.5, True):  # a string failed with a raw TypeError; 1.5 and True were accepted
        with pytest.raises(InvalidInputError, match="retrievals must be an integer >= 0"):
            RetrievalPlan("search", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="at least one tool"):
        retrieval_agent(KVPackChatModel(), [])


@pytest.mark.default_model
def test_example_script_runs_and_matches_text_stuffing(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("langchain_agent_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(str(tmp_path / "store"), 2)
    assert all(chain["identical"] for chain in report["chains"])
    assert report["kv_prefilled"] < report["text_prefilled"] / 2
    assert "identical to text stuffing: True" in capsys.readouterr().out


def test_plan_counts_only_this_questions_retrievals() -> None:
    from langchain.agents.middleware import ModelRequest
    from langchain_core.messages import ToolMessage

    plan = RetrievalPlan("search", 1)
    call = {"name": "search", "args": {"query": "q"}, "id": "c1", "type": "tool_call"}
    result = ToolMessage("r", tool_call_id="c1", name="search")
    earlier = [HumanMessage("first"), AIMessage("", tool_calls=[call]), result, AIMessage("answer")]
    request = ModelRequest(model=KVPackChatModel(), messages=[*earlier, HumanMessage("second")])
    assert plan._plan(request).tool_choice == "search"  # the first question's retrieval does not count
    done = [*request.messages, AIMessage("", tool_calls=[call]), result]
    assert plan._plan(ModelRequest(model=KVPackChatModel(), messages=done)).tool_choice == "none"
