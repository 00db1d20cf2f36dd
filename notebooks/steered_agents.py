"""Two agent roles, one model, one knowledge base: a LangGraph graph whose nodes are steered differently.

Run: python notebooks/steered_agents.py [--store DIR] [--alpha 0.75]

The bundled demo facts become one knowledge pack, bound to one `KVPackChatModel`. A LangGraph graph
has two nodes: `support` answers a customer from the knowledge base, steered towards a formal
register; `engineer` then writes a Python function from that answer, steered towards defensive code
(input validation). Both vectors are built from the contrastive pairs shipped with the package. The
role comes from each node's metadata (`agent_role`), and `KVPackSteeringCallback` maps roles to
vectors; both nodes read the same cached pack, and each reply's usage report names its steering.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, TypedDict

from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, StateGraph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from langchain_agent import build_demo_pack  # the sibling example

from kvpack_integrations import load_model
from kvpack_integrations.evaluation.steering import DEMO
from kvpack_integrations.langchain import KVPackChatModel, KVPackSteeringCallback
from kvpack_integrations.steering import build_steering_vector, load_pairs

QUESTION = "Which company produces the Tessel-9 battery, and where is it based?"


class Team(TypedDict):
    answer: str
    code: str
    usage: dict[str, Any]


def run(store: str, alpha: float) -> dict[str, Any]:
    kb = build_demo_pack(store)
    chat = KVPackChatModel(kb=kb, store=store, max_tokens=96, stop=["\n```\n"])
    model = load_model()
    steer = KVPackSteeringCallback(
        roles={
            "support": build_steering_vector(model, load_pairs(DEMO / "formal_pairs.jsonl"), name="formal").with_alpha(
                alpha
            ),
            "engineer": build_steering_vector(
                model, load_pairs(DEMO / "defensive_pairs.jsonl"), name="defensive"
            ).with_alpha(alpha),
        }
    )

    def support(state: Team) -> dict[str, Any]:
        reply = chat.invoke([HumanMessage(QUESTION)])
        return {"answer": reply.content, "usage": {**state["usage"], "support": reply.response_metadata["kvpack"]}}

    def engineer(state: Team) -> dict[str, Any]:
        task = (
            f"Write a Python function `battery_maker(battery)` that returns the maker of a battery. {state['answer']}"
        )
        reply = chat.invoke([HumanMessage(task)])
        return {"code": reply.content, "usage": {**state["usage"], "engineer": reply.response_metadata["kvpack"]}}

    graph = StateGraph(Team)
    graph.add_node("support", support, metadata={"agent_role": "support"})
    graph.add_node("engineer", engineer, metadata={"agent_role": "engineer"})
    graph.add_edge(START, "support")
    graph.add_edge("support", "engineer")
    graph.add_edge("engineer", END)
    out = graph.compile().invoke({"answer": "", "code": "", "usage": {}}, config={"callbacks": [steer]})
    return {"answer": out["answer"], "code": out["code"], "usage": out["usage"], "applied": steer.applied}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="pack store (default: a temporary directory)")
    parser.add_argument("--alpha", type=float, default=0.75)
    args = parser.parse_args()
    result = run(args.store or tempfile.mkdtemp(), args.alpha)
    for role, text in (("support", result["answer"]), ("engineer", result["code"])):
        u = result["usage"][role]
        print(f"--- {role}: steering {u['steering']}, {u['cached_tokens']} of {u['input_tokens']} tokens from cache")
        print(text.strip())
    print(json.dumps({role: u["steering"] for role, u in result["usage"].items()}))


if __name__ == "__main__":
    main()
