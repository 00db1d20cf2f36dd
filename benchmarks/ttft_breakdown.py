"""Where KV time-to-first-token goes: load + verify the pack, compose the cache, prefill the question,
first decode step, measured on HotpotQA dev rows with all passages (default model, CPU).

Usage: python benchmarks/ttft_breakdown.py [N]  -> benchmarks/results/ttft_breakdown.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kvpack_integrations import Engine, KnowledgeFormat, PackStore, build_pack, knowledge_prompt, load_model, load_pack
from kvpack_integrations.composition import RadixTree, forward
from kvpack_integrations.evaluation.datasets import load_rows
from kvpack_integrations.evaluation.machine import machine_info

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa_dev_300.jsonl"


def main(n: int) -> None:
    model = load_model()
    fmt = KnowledgeFormat()
    store = PackStore(tempfile.mkdtemp())
    parts: dict[str, list[float]] = {
        "load_verify_ms": [],
        "compose_ms": [],
        "prefill_question_ms": [],
        "first_decode_step_ms": [],
        "full_text_prefill_ms": [],
    }
    for i, row in enumerate(load_rows(DATA, limit=n)):
        facts = row.facts()
        build_pack(model, RadixTree(model.fingerprint), store, f"r{i}", facts)
        ids = knowledge_prompt(model.tokenizer, facts, row.question, fmt).token_ids
        engine = Engine(model)
        t0 = time.perf_counter()
        load_pack(model, engine.tree, store, f"r{i}")
        t1 = time.perf_counter()
        composed = engine.compose(ids)
        t2 = time.perf_counter()
        logits = forward(model, composed.cache, ids[composed.cached_tokens :])
        t3 = time.perf_counter()
        forward(model, composed.cache, [int(logits.argmax())])
        t4 = time.perf_counter()
        text = Engine(model).compose(ids, strategy="text")
        t5 = time.perf_counter()
        forward(model, text.cache, ids)
        t6 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t6 - t5)):
            parts[key].append(value * 1000)
        store.delete(f"r{i}")
    out = {key: statistics.median(v) for key, v in parts.items()}
    out.update(n=n, model=model.name, machine=machine_info())
    path = Path(__file__).parent / "results" / "ttft_breakdown.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
