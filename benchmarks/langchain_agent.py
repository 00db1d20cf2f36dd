"""A 5-step retrieval agent, side by side: KVPackChatModel vs ChatHuggingFace text stuffing, same weights.

Per question (MuSiQue dev): the question's passages become a stored knowledge pack, bound to the chat
model (`kb=`) and searched by the agent's retriever tool. The agent (`langchain.agents.create_agent`
with a `RetrievalPlan`) makes `steps - 1` forced retrievals of k passages, then answers.

The text arm is LangChain's `ChatHuggingFace` over a `HuggingFacePipeline` on the same model object.
It cannot run this agent itself (it has no tool calling for local models), so each of our steps is
replayed on it with the plain-text twin of our prompt (knowledge, tools, calls and results as text),
generating as many tokens as we did, greedily; its prompt is checked to be token-identical to ours.
Both arms run in one process on the same weights, row by row (the replay needs our prompts first).

Usage: python benchmarks/langchain_agent.py [--limit 10] [--steps 5] [--k 2]   (resumes from --records)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
from transformers import pipeline

from kvpack_integrations import PackStore, build_pack, load_model
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.engine.registry import shared_engine
from kvpack_integrations.evaluation.datasets import load_rows
from kvpack_integrations.evaluation.machine import machine_info
from kvpack_integrations.evaluation.records import RecordLog
from kvpack_integrations.langchain import KVPackChatModel, KVPackRetriever
from kvpack_integrations.langchain.agent import final_answer, retrieval_agent
from kvpack_integrations.langchain.text_twin import text_stuffed_messages

ROOT = Path(__file__).resolve().parent
MAX_TOKENS = 48
ANSWER_NUDGE = "Now answer my original question in a few words, without calling a tool."


def _kv_arm(chat: KVPackChatModel, retriever: KVPackRetriever, question: str, retrievals: int) -> dict[str, Any]:
    agent = retrieval_agent(chat, [retriever.search_tool()], retrievals=retrievals, answer_nudge=ANSWER_NUDGE)
    t0 = time.perf_counter()
    state = agent.invoke({"messages": [HumanMessage(question)]})
    wall = time.perf_counter() - t0
    messages = state["messages"]
    steps, prompts = [], []
    for i, m in enumerate(messages):
        if isinstance(m, AIMessage):
            meta = m.response_metadata["kvpack"]
            steps.append(
                {
                    "input_tokens": meta["input_tokens"],
                    "cached_tokens": meta["cached_tokens"],
                    "prefilled_tokens": meta["prefilled_tokens"],
                    "output_tokens": meta["output_tokens"],
                    "ttft_ms": meta["ttft_ms"],
                    "model_ms": meta["total_ms"],
                    "tool_calls": [c["args"] for c in m.tool_calls],
                }
            )
            final = i == len(messages) - 1  # the answer step: RetrievalPlan added the nudge to its request
            prompts.append([*messages[:i], HumanMessage(ANSWER_NUDGE)] if final else messages[:i])
    return {"steps": steps, "prompts": prompts, "answer": final_answer(messages), "wall_s": wall}


def _text_arm(
    hf: ChatHuggingFace,
    chat: KVPackChatModel,
    tools: list[dict[str, Any]],
    prompts: list[list[Any]],
    kv_steps: list[dict[str, Any]],
) -> dict[str, Any]:
    tokenizer = chat.loaded_model().tokenizer
    steps, answer, t_all = [], "", 0.0
    for history, kv in zip(prompts, kv_steps):
        twin = text_stuffed_messages(chat, history, tools=tools)
        ids = tokenizer(hf._to_chat_prompt(twin.messages), add_special_tokens=False)["input_ids"]
        new_tokens = max(1, kv["output_tokens"])
        t0 = time.perf_counter()
        reply = hf.invoke(twin.messages, pipeline_kwargs={"max_new_tokens": new_tokens, "do_sample": False})
        dt = time.perf_counter() - t0
        t_all += dt
        steps.append(
            {
                "input_tokens": len(ids),
                "prefilled_tokens": len(ids),
                "model_ms": dt * 1000,
                "prompt_identical": list(ids) == twin.token_ids,
            }
        )
        answer = str(reply.content)
    return {"steps": steps, "answer": answer, "model_s": t_all}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = load_rows(args.data, args.limit)
    loaded = load_model()
    store = PackStore(ROOT / "stores" / "agent")
    config = {
        "data": Path(args.data).name,
        "steps": args.steps,
        "k": args.k,
        "max_tokens": MAX_TOKENS,
        "answer_nudge": ANSWER_NUDGE,
        "fingerprint": loaded.fingerprint.digest,
    }
    log = RecordLog(args.records, config, [row.digest() for row in rows])  # records of other rows: refused
    generator = pipeline("text-generation", model=loaded.model, tokenizer=loaded.tokenizer, return_full_text=False)
    hf = ChatHuggingFace(llm=HuggingFacePipeline(pipeline=generator), tokenizer=loaded.tokenizer)
    for index, row in enumerate(rows):
        if log.done(index):
            continue
        name = f"musique-{index}-{row.digest()[:8]}-{loaded.fingerprint.digest[:8]}"  # never another row's or model's
        if not store.exists(name):
            build_pack(loaded, RadixTree(loaded.fingerprint), store, name, row.facts())
        shared_engine(loaded).tree.clear()  # each question starts cold: only its pack, loaded from disk
        chat = KVPackChatModel(kb=name, store=str(store.root), max_tokens=MAX_TOKENS)
        retriever = KVPackRetriever(kb=name, store=str(store.root), k=args.k)
        tools = [convert_to_openai_tool(retriever.search_tool())]
        kv = _kv_arm(chat, retriever, row.question, args.steps - 1)
        text = _text_arm(hf, chat, tools, kv.pop("prompts"), kv["steps"])
        same = kv["answer"].strip() == text["answer"].strip()
        log.add(
            index,
            {
                "question": row.question,
                "answers": list(row.answers),
                "kv": kv,
                "text": text,
                "same_answer": same,
            },
        )
        print(
            f"row {index}: kv prefilled {sum(s['prefilled_tokens'] for s in kv['steps'])}, text "
            f"{sum(s['prefilled_tokens'] for s in text['steps'])}, same answer {same}",
            flush=True,
        )
    return summarize(log.ordered(), config)


def summarize(records: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    kv_prefill = sum(s["prefilled_tokens"] for r in records for s in r["kv"]["steps"])
    text_prefill = sum(s["prefilled_tokens"] for r in records for s in r["text"]["steps"])
    pack_tokens = sum(r["kv"]["steps"][0]["cached_tokens"] for r in records)
    kv_ms = sum(s["model_ms"] for r in records for s in r["kv"]["steps"])
    text_ms = sum(s["model_ms"] for r in records for s in r["text"]["steps"])
    n_steps = max(len(r["kv"]["steps"]) for r in records)
    per_step = []
    for k in range(n_steps):
        kv_k = [r["kv"]["steps"][k] for r in records if len(r["kv"]["steps"]) > k]
        tx_k = [r["text"]["steps"][k] for r in records if len(r["text"]["steps"]) > k]
        per_step.append(
            {
                "step": k + 1,
                "kv_prefilled_mean": statistics.mean(s["prefilled_tokens"] for s in kv_k),
                "kv_cached_mean": statistics.mean(s["cached_tokens"] for s in kv_k),
                "text_prefilled_mean": statistics.mean(s["prefilled_tokens"] for s in tx_k),
                "kv_model_ms_mean": statistics.mean(s["model_ms"] for s in kv_k),
                "text_model_ms_mean": statistics.mean(s["model_ms"] for s in tx_k),
            }
        )
    return {
        "benchmark": "langchain_agent",
        "config": config,
        "rows": len(records),
        "model": "SmolLM2-135M-Instruct (float32)",
        "machine": machine_info(),
        "kv_prefilled_tokens": kv_prefill,
        "text_prefilled_tokens": text_prefill,
        "prefill_reduction": 1 - kv_prefill / text_prefill,
        # the one-time pack build (the pack is served from the store at step 1, cached_tokens there)
        "pack_build_tokens": pack_tokens,
        "prefill_reduction_incl_pack_build": 1 - (kv_prefill + pack_tokens) / text_prefill,
        "kv_model_s": kv_ms / 1000,
        "text_model_s": text_ms / 1000,
        "model_time_ratio": text_ms / kv_ms,
        "kv_agent_wall_s": sum(r["kv"]["wall_s"] for r in records),
        "answers_identical": sum(r["same_answer"] for r in records),
        "prompts_identical": sum(all(s["prompt_identical"] for s in r["text"]["steps"]) for r in records),
        "per_step": per_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent.parent / "shared" / "data" / "musique_dev_200.jsonl"))
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--records", default=str(ROOT / "results" / "langchain_agent_musique_dev.records.jsonl"))
    parser.add_argument("--output", default=str(ROOT / "results" / "langchain_agent_musique_dev.json"))
    args = parser.parse_args()
    result = run(args)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_step", "machine")}, indent=1))


if __name__ == "__main__":
    main()
