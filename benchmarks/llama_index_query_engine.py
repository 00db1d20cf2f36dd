"""A stock text `RetrieverQueryEngine` vs `KVPackQueryEngine`, side by side: same questions, same model.

Per question (HotpotQA dev): the question's passages become a stored knowledge pack (built before
timing). Both engines use the same `KVPackLlamaRetriever` over it (`similarity_top_k` passages, in
pack order) and the same prompt layout:

* text arm: LlamaIndex's own `RetrieverQueryEngine.from_args` with its default `compact` synthesizer
  and `text_qa_template()`, so the nodes are flattened into `context_str`; the LLM is `KVPackLLM` with
  `strategy="text"` (plain text stuffing on the same weights, nothing cached or remembered);
* KV arm: `KVPackQueryEngine`, the nodes handed to `KVPackLLM` as segments (`strategy="exact"`); each
  question starts with an empty prefix tree, so what it reuses is loaded from the stored pack inside
  its timing.

Greedy decoding, the arm that goes first alternating by row. Per query: both answers (identical?),
prompt tokens prefilled, TTFT (the engine's, from the LLM call to the first token; the pack load is
counted in the KV arm's) and the wall time of the whole `query()` (retrieval included).

With `--top-k 10` (the default) every passage of the question comes back (HotpotQA's distractor
setting), in pack order, so the stored pack is a prefix of the prompt. With fewer, exact reuse covers
the nodes up to the first one that does not follow the pack's order; the rest is prefilled.

Usage: python benchmarks/llama_index_query_engine.py [--limit 20] [--top-k 10] [--max-new-tokens 32]
(resumes from --records)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from llama_index.core.query_engine import RetrieverQueryEngine

from kvpack_integrations import PackStore, build_pack, load_model
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.engine.registry import shared_engine
from kvpack_integrations.evaluation.datasets import load_rows
from kvpack_integrations.evaluation.machine import machine_info
from kvpack_integrations.evaluation.metrics import f1_score
from kvpack_integrations.evaluation.records import RecordLog
from kvpack_integrations.llama_index import (
    KVPackLlamaRetriever,
    KVPackLLM,
    KVPackQueryEngine,
    record_usage,
    text_qa_template,
)

ROOT = Path(__file__).resolve().parent


def _ask(engine: Any, question: str, answers: list[str]) -> dict[str, Any]:
    with record_usage() as usage:
        t0 = time.perf_counter()
        response = engine.query(question)
        wall = time.perf_counter() - t0
    (report,) = usage.reports  # one LLM call per query: the nodes fit one prompt
    return {
        "answer": response.response,
        "f1": f1_score(str(response.response), answers),
        "nodes": [n.node.node_id for n in response.source_nodes],
        "input_tokens": report["input_tokens"],
        "cached_tokens": report["cached_tokens"],
        "prefilled_tokens": report["prefilled_tokens"],
        "ttft_ms": report["ttft_ms"],
        "wall_ms": wall * 1000,
        "strategy": report["strategy"],
        "exact": report["exact"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = load_rows(args.data, args.limit)
    loaded = load_model()
    store = PackStore(args.store)
    config = {
        "data": Path(args.data).name,
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
        "fingerprint": loaded.fingerprint.digest,
    }
    log = RecordLog(args.records, config, [row.digest() for row in rows])  # records of other rows: refused
    kv_llm = KVPackLLM(max_tokens=args.max_new_tokens)
    text_llm = KVPackLLM(max_tokens=args.max_new_tokens, strategy="text", remember=False)
    for index, row in enumerate(rows):
        if log.done(index):
            continue
        name = (
            f"hotpot-{index:05d}-{row.digest()[:8]}-{loaded.fingerprint.digest[:8]}"  # never another row's or model's
        )
        if not store.exists(name):
            build_pack(loaded, RadixTree(loaded.fingerprint), store, name, row.facts())
        retriever = KVPackLlamaRetriever(name, store=str(store.root), similarity_top_k=args.top_k, order="source")
        stock = RetrieverQueryEngine.from_args(retriever, llm=text_llm, text_qa_template=text_qa_template())
        ours = KVPackQueryEngine(retriever, kv_llm)
        shared_engine(loaded).tree.clear()  # each question starts cold: only its pack, loaded from disk
        answers = list(row.answers)
        if index % 2 == 0:
            text = _ask(stock, row.question, answers)
            kv = _ask(ours, row.question, answers)
        else:
            kv = _ask(ours, row.question, answers)
            text = _ask(stock, row.question, answers)
        same = kv["answer"] == text["answer"] and kv["nodes"] == text["nodes"]
        log.add(index, {"question": row.question, "answers": answers, "kv": kv, "text": text, "identical": same})
        print(
            f"row {index}: prefilled kv/text {kv['prefilled_tokens']}/{text['prefilled_tokens']}, "
            f"TTFT kv/text {kv['ttft_ms']:.0f}/{text['ttft_ms']:.0f} ms, identical {same}",
            flush=True,
        )
    return summarize(log.ordered(), config)


def summarize(records: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    def values(arm: str, key: str) -> list[float]:
        return [r[arm][key] for r in records]

    kv_ttft, text_ttft = statistics.median(values("kv", "ttft_ms")), statistics.median(values("text", "ttft_ms"))
    kv_prefill, text_prefill = sum(values("kv", "prefilled_tokens")), sum(values("text", "prefilled_tokens"))
    return {
        "benchmark": "llama_index_query_engine",
        "config": config,
        "rows": len(records),
        "model": "SmolLM2-135M-Instruct (float32)",
        "machine": machine_info(),
        "answers_identical": sum(r["identical"] for r in records),
        "prompt_tokens_mean": statistics.mean(values("text", "input_tokens")),
        "prefilled_per_query_kv_mean": kv_prefill / len(records),
        "prefilled_per_query_text_mean": text_prefill / len(records),
        "prefill_reduction": 1 - kv_prefill / text_prefill,
        "ttft_ms_kv_median": kv_ttft,
        "ttft_ms_text_median": text_ttft,
        "ttft_ratio_text_over_kv": text_ttft / kv_ttft,
        "query_wall_ms_kv_median": statistics.median(values("kv", "wall_ms")),
        "query_wall_ms_text_median": statistics.median(values("text", "wall_ms")),
        "f1_kv_mean": statistics.mean(values("kv", "f1")),
        "f1_text_mean": statistics.mean(values("text", "f1")),
        "all_exact": all(r["kv"]["exact"] for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent.parent / "shared" / "data" / "hotpotqa_dev_300.jsonl"))
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--store", default=str(ROOT / "stores" / "llama_index"))
    parser.add_argument("--records", default=str(ROOT / "results" / "llama_index_query_engine.records.jsonl"))
    parser.add_argument("--output", default=str(ROOT / "results" / "llama_index_query_engine.json"))
    args = parser.parse_args()
    result = run(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
