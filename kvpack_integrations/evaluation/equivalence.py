"""`kvpack eval equivalence`: the same questions answered from text (RAG) and from stored packs (KV).

Per row: the passages become a pack (built and saved before timing); then RAG prefills knowledge +
question as text, while KV loads the pack from the store, reuses it by token prefix and prefills the
rest. The two arms alternate which goes first. A divergence is any difference in generated ids.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..composition.radix_tree import RadixTree
from ..engine.engine import Engine
from ..engine.settings import GenerationSettings
from ..engine.usage import GenerationResult
from ..knowledge.packs import build_pack, knowledge_prompt, load_pack
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.loader import LoadedModel
from ..segments.pack_store import PackStore
from .datasets import QARow
from .machine import machine_info
from .metrics import exact_match, f1_score
from .records import RecordLog


@dataclass(frozen=True)
class EquivalenceOptions:
    gold_only: bool = False
    raw: bool = False
    max_new_tokens: int = 32
    keep_packs: bool = False


def _arm(result: GenerationResult, answers: Sequence[str]) -> dict[str, Any]:
    u = result.usage
    return {
        "text": result.text,
        "ids": result.token_ids,
        "em": exact_match(result.text, answers),
        "f1": f1_score(result.text, answers),
        "prefilled": u.prefilled_tokens,
        "cached": u.cached_tokens,
        "input": u.input_tokens,
        "ttft_ms": u.ttft_ms,
        "exact": u.exact,
    }


def _kv(loaded: LoadedModel, store: PackStore, name: str, ids: list[int], settings: GenerationSettings):
    t0 = time.perf_counter()
    engine = Engine(loaded)  # empty prefix tree: everything reused comes from the store
    load_pack(loaded, engine.tree, store, name)
    return engine.generate(ids, settings, started_at=t0)


def _row(loaded: LoadedModel, store: PackStore, index: int, row: QARow, opts: EquivalenceOptions) -> dict[str, Any]:
    name = f"eq-{os.getpid()}-{index:05d}"  # the process in the name: two runs on one store never share a pack
    try:
        return _compare(loaded, store, name, index, row, opts)
    finally:  # an interrupted row leaves no pack behind either (the next run has another process id)
        if not opts.keep_packs:
            for pack in (name, _raw(name)):
                if store.exists(pack):
                    store.delete(pack)


def _raw(name: str) -> str:
    """The row's second pack, of raw (untemplated) text, for the `--raw` ablation."""
    return f"{name}-raw"


def _compare(
    loaded: LoadedModel, store: PackStore, name: str, index: int, row: QARow, opts: EquivalenceOptions
) -> dict[str, Any]:
    fmt = KnowledgeFormat()
    facts = row.facts(opts.gold_only)
    settings = GenerationSettings(max_new_tokens=opts.max_new_tokens)
    report = build_pack(loaded, RadixTree(loaded.fingerprint), store, name, facts, fmt=fmt)
    ids = knowledge_prompt(loaded.tokenizer, facts, row.question, fmt).token_ids
    text_engine = Engine(loaded, max_cached_tokens=0)

    def rag() -> GenerationResult:
        return text_engine.generate(ids, settings, strategy="text")

    def kv() -> GenerationResult:
        return _kv(loaded, store, name, ids, settings)

    first, second = (rag, kv) if index % 2 == 0 else (kv, rag)
    a, b = first(), second()
    rag_result, kv_result = (a, b) if index % 2 == 0 else (b, a)
    record: dict[str, Any] = {
        "passages": len(facts),
        "pack_bytes": report.bytes_on_disk,
        "build_s": report.seconds,
        "rag": _arm(rag_result, row.answers),
        "kv": _arm(kv_result, row.answers),
    }
    record["diverged"] = record["rag"]["ids"] != record["kv"]["ids"]
    if opts.raw:
        raw_name = _raw(name)
        build_pack(loaded, RadixTree(loaded.fingerprint), store, raw_name, facts, fmt=fmt, raw=True)
        raw_ids = knowledge_prompt(loaded.tokenizer, facts, row.question, fmt, raw=True).token_ids
        record["kv_raw"] = _arm(_kv(loaded, store, raw_name, raw_ids, settings), row.answers)
    return record


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else 0.0


def summarize(records: list[dict[str, Any]], loaded: LoadedModel, opts: EquivalenceOptions) -> dict[str, Any]:
    kv = [r["kv"] for r in records]
    rag = [r["rag"] for r in records]
    ttft_kv = statistics.median(a["ttft_ms"] for a in kv)
    ttft_rag = statistics.median(a["ttft_ms"] for a in rag)
    tokens_kv, tokens_rag = _mean([a["prefilled"] for a in kv]), _mean([a["prefilled"] for a in rag])
    out: dict[str, Any] = {
        "eval": "equivalence",
        "n": len(records),
        "divergences": sum(bool(r["diverged"]) for r in records),
        "em_kv": _mean([a["em"] for a in kv]),
        "em_rag": _mean([a["em"] for a in rag]),
        "f1_kv": _mean([a["f1"] for a in kv]),
        "f1_rag": _mean([a["f1"] for a in rag]),
        "prompt_tokens_kv": tokens_kv,
        "prompt_tokens_rag": tokens_rag,
        "prompt_token_ratio": tokens_kv / tokens_rag if tokens_rag else None,
        "cached_tokens_kv": _mean([a["cached"] for a in kv]),
        "ttft_ms_kv": ttft_kv,
        "ttft_ms_rag": ttft_rag,
        "ttft_ratio": ttft_rag / ttft_kv if ttft_kv else None,
        "exact": all(a["exact"] for a in kv),
        "passages_per_row": _mean([r["passages"] for r in records]),
        "pack_bytes_mean": _mean([r["pack_bytes"] for r in records]),
        "build_s_mean": _mean([r["build_s"] for r in records]),
        "options": asdict(opts),
        "model": loaded.name,
        "fingerprint": loaded.fingerprint.digest,
        "dtype": loaded.fingerprint.dtype,
    }
    if opts.raw:
        raw = [r["kv_raw"] for r in records]
        out["em_kv_raw"] = _mean([a["em"] for a in raw])
        out["f1_kv_raw"] = _mean([a["f1"] for a in raw])
        out["em_raw_minus_kv"] = out["em_kv_raw"] - out["em_kv"]
        out["f1_raw_minus_kv"] = out["f1_kv_raw"] - out["f1_kv"]
        out["raw_differs_from_rag"] = sum(a["ids"] != r["rag"]["ids"] for a, r in zip(raw, records))
    return out


def run_equivalence(
    loaded: LoadedModel,
    rows: Sequence[QARow],
    store: PackStore,
    opts: EquivalenceOptions,
    *,
    records_path: str | Path | None = None,
    data_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume, given `records_path`) the evaluation; returns the summary with machine info."""
    config = {
        "eval": "equivalence",
        "data": data_name,
        "fingerprint": loaded.fingerprint.digest,
        "device": str(loaded.device),
        "threads": torch.get_num_threads(),
        **asdict(opts),
    }
    log = RecordLog(records_path, config, [row.digest() for row in rows])
    store = PackStore(store.root / "eval-equivalence")  # never touches the user's own packs
    t0 = time.perf_counter()
    for i, row in enumerate(tqdm(rows, desc="equivalence", disable=not progress)):
        if not log.done(i):
            log.add(i, _row(loaded, store, i, row, opts))
    records = log.ordered()[: len(rows)]
    summary = summarize(records, loaded, opts)
    summary["data"] = data_name
    summary["records_set_aside"] = log.set_aside  # records of another configuration, not reused
    summary["elapsed_s"] = time.perf_counter() - t0
    summary["machine"] = machine_info()
    return summary
