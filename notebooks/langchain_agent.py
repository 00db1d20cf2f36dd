"""A LangChain retrieval agent whose knowledge travels as KV segments, checked against text stuffing.

Run: python notebooks/langchain_agent.py [--store DIR] [--retrievals 2]

It builds a knowledge pack from the bundled demo facts, binds it to `KVPackChatModel`, gives a
`langchain.agents.create_agent` agent the pack's retriever tool, and asks the demo goals. Each agent
runs twice on the same weights: with KV segments (`strategy="exact"`) and with plain text stuffing
(`strategy="text"`); every message of both runs must be identical, and the table shows what each
step prefilled.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage

from kvpack_integrations import PackStore, build_pack, load_model
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.langchain import KVPackChatModel, KVPackRetriever
from kvpack_integrations.langchain.agent import retrieval_agent

NUDGE = "Now answer my original question in a few words."
SYSTEM = "Search the knowledge base with a few keywords from the user's question, then answer."


def build_demo_pack(store_dir: str, name: str = "demo") -> str:
    """The bundled demo facts as a knowledge pack (built once per store)."""
    store = PackStore(store_dir)
    if not store.exists(name):
        facts = resources.files("kvpack_integrations.demo").joinpath("facts.txt").read_text().splitlines()
        loaded = load_model()
        build_pack(loaded, RadixTree(loaded.fingerprint), store, name, facts)
    return name


def run_agent(strategy: str, store_dir: str, kb: str, goal: str, retrievals: int) -> list[Any]:
    chat = KVPackChatModel(kb=kb, store=store_dir, max_tokens=40, strategy=strategy)
    tool = KVPackRetriever(kb=kb, store=store_dir, k=2).search_tool()
    agent = retrieval_agent(chat, [tool], retrievals=retrievals, answer_nudge=NUDGE, system_prompt=SYSTEM)
    return list(agent.invoke({"messages": [HumanMessage(goal)]})["messages"])


def trajectory(messages: list[Any]) -> list[tuple[str, str, list[Any]]]:
    """What an agent run said and did (tool-call ids are random, so they are left out)."""
    return [(m.type, m.text, [(c["name"], c["args"]) for c in getattr(m, "tool_calls", [])]) for m in messages]


def steps_of(messages: list[Any]) -> list[dict[str, Any]]:
    """Per model call: what it prefilled and what came from cache."""
    return [
        {
            "prefilled": m.response_metadata["kvpack"]["prefilled_tokens"],
            "cached": m.response_metadata["kvpack"]["cached_tokens"],
            "calls": [c["args"] for c in m.tool_calls],
        }
        for m in messages
        if isinstance(m, AIMessage)
    ]


def main(store_dir: str, retrievals: int) -> dict[str, Any]:
    kb = build_demo_pack(store_dir)
    goals = json.loads(resources.files("kvpack_integrations.demo").joinpath("questions.json").read_text())
    report = []
    for chain in goals["chains"]:
        kv = run_agent("exact", store_dir, kb, chain["goal"], retrievals)
        text = run_agent("text", store_dir, kb, chain["goal"], retrievals)
        same = trajectory(kv) == trajectory(text)
        kv_steps, text_steps = steps_of(kv), steps_of(text)
        report.append(
            {
                "goal": chain["goal"],
                "answer": kv[-1].text,
                "identical": same,
                "kv_prefilled": [s["prefilled"] for s in kv_steps],
                "text_prefilled": [s["prefilled"] for s in text_steps],
                "queries": [c.get("query") for s in kv_steps for c in s["calls"]],
            }
        )
        print(f"\n{chain['goal']}\n  queries: {report[-1]['queries']}\n  answer: {kv[-1].text.strip()[:80]!r}")
        print(f"  prefilled per step, KV {report[-1]['kv_prefilled']} vs text {report[-1]['text_prefilled']}")
        print(f"  identical to text stuffing: {same}")
    kv_total = sum(sum(r["kv_prefilled"]) for r in report)
    text_total = sum(sum(r["text_prefilled"]) for r in report)
    print(f"\nprefilled tokens: KV {kv_total} vs text {text_total} ({1 - kv_total / text_total:.0%} fewer)")
    return {"chains": report, "kv_prefilled": kv_total, "text_prefilled": text_total}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "kvpack-agent-example"))
    parser.add_argument("--retrievals", type=int, default=2)
    args = parser.parse_args()
    main(args.store, args.retrievals)
