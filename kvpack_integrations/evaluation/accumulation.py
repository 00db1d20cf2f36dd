"""`kvpack eval accumulation`: knowledge that grows by one passage per agent step (the paper's Table 2).

Step k knows passages 1..k (supporting passages first, then distractors). KV extends the session's
cache sequentially: passage k is prefilled once, with passages 1..k-1 already cached in front, and
the question is then answered from the composed cache. RAG re-sends all k passages as text. Both
arms answer from the same single rendering, so greedy outputs must be identical at every step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from ..engine.engine import Engine
from ..engine.settings import GenerationSettings
from ..errors import InvalidInputError
from ..knowledge.packs import knowledge_prompt
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.loader import LoadedModel
from .datasets import QARow
from .machine import machine_info
from .metrics import exact_match
from .records import RecordLog


def _row(loaded: LoadedModel, row: QARow, steps: int, settings: GenerationSettings) -> dict[str, Any]:
    fmt = KnowledgeFormat()
    passages = row.gold_first()[:steps]
    session = Engine(loaded)  # one agent session: its prefix cache grows step by step
    text_engine = Engine(loaded, max_cached_tokens=0)
    out = []
    for k in range(1, steps + 1):
        prompt = knowledge_prompt(loaded.tokenizer, passages[:k], row.question, fmt)
        _, built = session.cache_prefix(prompt.token_ids, prompt.knowledge_cuts)
        kv = session.generate(prompt.token_ids, settings)
        rag = text_engine.generate(prompt.token_ids, settings, strategy="text")
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
    }
    log = RecordLog(records_path, config)
    t0 = time.perf_counter()
    for i, row in enumerate(tqdm(rows, desc="accumulation", disable=not progress)):
        if not log.done(i):
            log.add(i, _row(loaded, row, steps, settings))
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
                "ttft_ms_rag": statistics.median(c["ttft_ms_rag"] for c in cells),
            }
        )
    return {
        "eval": "accumulation",
        "n": len(records),
        "data": data_name,
        "steps": per_step,
        "all_identical": all(s["identical"] == len(records) for s in per_step),
        "model": loaded.name,
        "fingerprint": loaded.fingerprint.digest,
        "dtype": loaded.fingerprint.dtype,
        "max_new_tokens": max_new_tokens,
        "elapsed_s": time.perf_counter() - t0,
        "machine": machine_info(),
    }
