"""`kvpack demo`: the main job on the embedded default model, both ways, side by side.

Builds the bundled knowledge base as a pack, then walks multi-step question chains the way an agent
would: each step adds the previous answer to the conversation. KV reuses the pack and the previous
step's cache, so it prefills only what is new; RAG re-sends the knowledge and history every step.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from typing import Any

from ..composition.radix_tree import RadixTree
from ..engine.engine import Engine
from ..engine.settings import GenerationSettings
from ..knowledge.facts import clean_facts
from ..knowledge.packs import build_pack, knowledge_prompt, load_pack
from ..prompts.knowledge import KnowledgeFormat
from .common import add_common_args, emit, loaded_model, pack_store, positive_int

DEMO_KB = "kvpack-demo"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the bundled knowledge base and answer multi-step questions both ways")
    p.add_argument("--max-new-tokens", type=positive_int, default=24)
    add_common_args(p)
    p.set_defaults(run=run)


def _bundled() -> tuple[list[str], list[dict[str, Any]]]:
    base = resources.files("kvpack_integrations.demo")
    facts = clean_facts(base.joinpath("facts.txt").read_text(encoding="utf-8").splitlines())
    chains = json.loads(base.joinpath("questions.json").read_text(encoding="utf-8"))["chains"]
    return facts, chains


def run(args: argparse.Namespace) -> int:
    facts, chains = _bundled()
    loaded = loaded_model(args)
    store = pack_store(args)
    fmt = KnowledgeFormat()
    build = build_pack(loaded, RadixTree(loaded.fingerprint), store, DEMO_KB, facts, fmt=fmt)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, stop=("\n",))
    rows: list[dict[str, Any]] = []
    for chain in chains:
        session = Engine(loaded)  # one agent session per chain
        t0 = time.perf_counter()
        load_pack(loaded, session.tree, store, DEMO_KB)
        text_engine = Engine(loaded, max_cached_tokens=0)
        history: list[tuple[str, str]] = []
        for step, item in enumerate(chain["steps"], 1):
            ids = knowledge_prompt(loaded.tokenizer, facts, item["question"], fmt, history=history).token_ids
            kv = session.generate(ids, settings, started_at=t0 if step == 1 else None, remember_prompt=True)
            rag = text_engine.generate(ids, settings, strategy="text")
            rows.append(
                {
                    "goal": chain["goal"],
                    "step": step,
                    "question": item["question"],
                    "expected": item["answer"],
                    "answer_kv": kv.text.strip(),
                    "answer_rag": rag.text.strip(),
                    "identical": kv.token_ids == rag.token_ids,
                    "prefilled_kv": kv.usage.prefilled_tokens,
                    "prefilled_rag": rag.usage.prefilled_tokens,
                    "ttft_ms_kv": round(kv.usage.ttft_ms, 1),
                    "ttft_ms_rag": round(rag.usage.ttft_ms, 1),
                }
            )
            history.append((item["question"], kv.text.strip()))
    total_kv = sum(r["prefilled_kv"] for r in rows)
    total_rag = sum(r["prefilled_rag"] for r in rows)
    summary = {
        "model": loaded.name,
        "kb": DEMO_KB,
        "facts": len(facts),
        "pack_tokens": build.manifest.token_count,
        "steps": rows,
        "all_identical": all(r["identical"] for r in rows),
        "prefilled_kv": total_kv,
        "prefilled_rag": total_rag,
        "ttft_ms_kv": sum(r["ttft_ms_kv"] for r in rows),
        "ttft_ms_rag": sum(r["ttft_ms_rag"] for r in rows),
    }
    width = max(len(r["question"]) for r in rows)
    lines = [f"kvpack demo on {loaded.name}: {len(facts)} facts cached as {build.manifest.token_count} tokens", ""]
    w = 36
    lines.append(f"{'question':<{width}}  {'KV answer':<{w}} {'RAG answer':<{w}} same  prefill kv/rag  TTFT ms kv/rag")
    for r in rows:
        lines.append(
            f"{r['question']:<{width}}  {r['answer_kv'][:w]:<{w}} {r['answer_rag'][:w]:<{w}} "
            f"{'yes' if r['identical'] else 'NO':<4}  {r['prefilled_kv']:>5}/{r['prefilled_rag']:<7}  "
            f"{r['ttft_ms_kv']:>6.0f}/{r['ttft_ms_rag']:.0f}"
        )
    lines.append("")
    lines.append(
        f"tokens prefilled: KV {total_kv} vs RAG {total_rag} ({100 * (1 - total_kv / total_rag):.0f}% fewer); "
        f"total TTFT: KV {summary['ttft_ms_kv'] / 1000:.1f} s vs RAG {summary['ttft_ms_rag'] / 1000:.1f} s; "
        f"answers identical: {'all' if summary['all_identical'] else 'NOT all'}"
    )
    emit(args, summary, "\n".join(lines))
    return 0
