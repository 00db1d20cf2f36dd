"""`kvpack eval accumulation`: knowledge that grows by one passage per agent step (the paper's Table 2).

Step k knows passages 1..k (supporting passages first, then distractors). KV extends the session's
cache sequentially: passage k is prefilled once, with passages 1..k-1 already cached in front, and
the question is then answered from the composed cache. RAG re-sends all k passages as text. Both
arms answer from the same single rendering, so greedy outputs must be identical at every step.

Reported per step: `tokens_kv` (question-time prefill, the pack of passages 1..k being ready, as
for a pre-built knowledge pack), `build_tokens_kv` (passage k's incremental prefill), `savings` and
`savings_incl_build` for both views, and TTFT with the build of passage k included (`ttft_ms_kv`) and
without it (`ttft_ms_kv_query_only`). The arm that goes first alternates.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from ..engine.engine import Engine
from ..engine.settings import GenerationSettings
from ..engine.usage import GenerationResult
from ..errors import InvalidInputError
from ..knowledge.packs import KnowledgePrompt, knowledge_prompt
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.loader import LoadedModel
from .datasets import QARow
from .machine import machine_info
from .metrics import exact_match
from .records import RecordLog


def _kv_step(
    session: Engine, prompt: KnowledgePrompt, settings: GenerationSettings
) -> tuple[GenerationResult, int, float]:
    """Add the new passage to the session cache, then answer; TTFT includes that prefill."""
    t0 = time.perf_counter()
    _, built = session.cache_prefix(prompt.token_ids, prompt.knowledge_cuts)
    t1 = time.perf_counter()
    result = session.generate(prompt.token_ids, settings, started_at=t0)
    return result, built, result.usage.ttft_ms - (t1 - t0) * 1000


def _row(loaded: LoadedModel, index: int, row: QARow, steps: int, settings: GenerationSettings) -> dict[str, Any]:
    fmt = KnowledgeFormat()
    passages = row.gold_first()[:steps]
    session = Engine(loaded)  # one agent session: its prefix cache grows step by step
    text_engine = Engine(loaded, max_cached_tokens=0)
    out = []
    for k in range(1, steps + 1):
        prompt = knowledge_prompt(loaded.tokenizer, passages[:k], row.question, fmt)
        if (index + k) % 2 == 0:
            kv, built, ttft_query = _kv_step(session, prompt, settings)
            rag = text_engine.generate(prompt.token_ids, settings, strategy="text")
        else:
            rag = text_engine.generate(prompt.token_ids, settings, strategy="text")
            kv, built, ttft_query = _kv_step(session, prompt, settings)
        out.append(
            {
                "k": k,
                "identical": kv.token_ids == rag.token_ids,
                "em_kv": exact_match(kv.text, row.answers),
                "em_rag": exact_match(rag.text, row.answers),
                "tokens_kv": kv.usage.prefilled_tokens,
                "build_tokens_kv": built,
                "tokens_rag": rag.usage.prefilled_tokens,
                "ttft_ms_kv": kv.usage.ttft_ms,
                "ttft_ms_kv_query_only": ttft_query,
                "ttft_ms_rag": rag.usage.ttft_ms,
            }
        )
    return {"steps": out}


def run_accumulation(
    loaded: LoadedModel,
    rows: Sequence[QARow],
    steps: int,
    *,
    max_new_tokens: int = 32,
    records_path: str | None = None,
    data_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the accumulation evaluation; returns per-step aggregates."""
    if steps < 1:
        raise InvalidInputError(f"--steps must be >= 1, got {steps}")
    short = [i for i, r in enumerate(rows) if len(r.passages) < steps]
    if short:
        raise InvalidInputError(f"rows {short[:5]} have fewer than {steps} passages; lower --steps")
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    config = {
        "eval": "accumulation",
        "data": data_name,
        "steps": steps,
        "max_new_tokens": max_new_tokens,
        "fingerprint": loaded.fingerprint.digest,
        "device": str(loaded.device),
        "threads": torch.get_num_threads(),
    }
    log = RecordLog(records_path, config, [row.digest() for row in rows])
    t0 = time.perf_counter()
    for i, row in enumerate(tqdm(rows, desc="accumulation", disable=not progress)):
        if not log.done(i):
            log.add(i, _row(loaded, i, row, steps, settings))
    records = log.ordered()[: len(rows)]
    per_step = []
    for k in range(steps):
        cells = [r["steps"][k] for r in records]
        tokens_kv = statistics.fmean(c["tokens_kv"] for c in cells)
        built = statistics.fmean(c["build_tokens_kv"] for c in cells)
        tokens_rag = statistics.fmean(c["tokens_rag"] for c in cells)
        per_step.append(
            {
                "k": k + 1,
                "em_kv": statistics.fmean(c["em_kv"] for c in cells),
                "em_rag": statistics.fmean(c["em_rag"] for c in cells),
                "identical": sum(c["identical"] for c in cells),
                "tokens_kv": tokens_kv,
                "build_tokens_kv": built,
                "tokens_rag": tokens_rag,
                "savings": 1 - tokens_kv / tokens_rag,
                "savings_incl_build": 1 - (tokens_kv + built) / tokens_rag,
                "ttft_ms_kv": statistics.median(c["ttft_ms_kv"] for c in cells),
                "ttft_ms_kv_query_only": statistics.median(c["ttft_ms_kv_query_only"] for c in cells),
                "ttft_ms_rag": statistics.median(c["ttft_ms_rag"] for c in cells),
            }
        )
    return {
        "eval": "accumulation",
        "n": len(records),
        "data": data_name,
        "records_set_aside": log.set_aside,  # records of another configuration, not reused
        "steps": per_step,
        "all_identical": all(s["identical"] == len(records) for s in per_step),
        "model": loaded.name,
        "fingerprint": loaded.fingerprint.digest,
        "dtype": loaded.fingerprint.dtype,
        "max_new_tokens": max_new_tokens,
        "elapsed_s": time.perf_counter() - t0,
        "machine": machine_info(),
    }
