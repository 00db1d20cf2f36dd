"""`kvpack eval routing`: banked routing over a knowledge base holding every fact of a file.

Rows are `{fact, question, answer}` (with an empty question a row only adds its fact). The knowledge
base always holds every fact; `limit` samples that many questions (seeded). Per question: embed and
route (top-k facts from the nearest `probes` banks and, when hybrid, BM25's best), then the KV of the
routed facts is built lazily (exact: the facts rendered with the chat template as the system message,
each computed after the ones before, reused from the engine's bounded prefix tree when the same facts
come again), and the model answers. The oracle arm gives the model the right fact.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..engine.engine import Engine
from ..engine.settings import GenerationSettings
from ..errors import InvalidInputError
from ..knowledge.knowledge_base import DEFAULT_LEXICAL_WEIGHT, KnowledgeBase
from ..knowledge.packs import knowledge_prompt
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.device import dtype_name
from ..runtime.loader import LoadedModel
from ..runtime.paths import read_text_lines
from .machine import machine_info


@dataclass(frozen=True)
class RoutingRow:
    fact: str
    question: str
    answer: str


def load_routing_rows(path: str | Path) -> list[RoutingRow]:
    """Read `{fact, question, answer}` rows, naming the line of a malformed one."""
    path = Path(path)
    rows = []
    for no, line in enumerate(read_text_lines(path, "facts file"), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            fields = (raw["fact"], raw["question"], raw["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{path}:{no}: expected {{fact, question, answer}} ({exc})") from None
        if not all(isinstance(f, str) for f in fields) or not fields[0].strip():
            raise InvalidInputError(f"{path}:{no}: fact, question and answer must be strings, the fact non-empty")
        rows.append(RoutingRow(*fields))
    if not rows:
        raise InvalidInputError(f"{path} holds no rows")
    return rows


def _answer(engine: Engine, facts: Sequence[str], question: str, settings: GenerationSettings) -> tuple[str, float]:
    """Lazily cache the facts as a pack (exact), answer; returns (text, KV build ms)."""
    prompt = knowledge_prompt(engine.loaded.tokenizer, facts, question, KnowledgeFormat())
    t0 = time.perf_counter()
    engine.cache_prefix(prompt.token_ids, prompt.knowledge_cuts)
    build_ms = (time.perf_counter() - t0) * 1000
    return engine.generate(prompt.token_ids, settings).text, build_ms


def _check_same_facts(kb: KnowledgeBase, facts: list[str], digest: str) -> None:
    """Refuse a reused base built from another file, even one with as many rows. Its label says so in
    ~1 ms; a base built before labels were kept is compared fact by fact once, then labelled."""
    label = kb.label("facts_sha256")
    same = len(kb) == len(facts) and (label == digest if label is not None else kb.facts() == facts)
    if not same:
        raise InvalidInputError(
            f"knowledge base {kb.name!r} at {kb.where} holds other facts than the file ({len(kb)} against "
            f"{len(facts)}): remove it or pass another --kb-dir"
        )
    if label is None:
        kb.set_label("facts_sha256", digest)


def run_routing(
    loaded: LoadedModel | None,
    rows: Sequence[RoutingRow],
    kb: KnowledgeBase,
    *,
    limit: int | None = None,
    k: int = 1,
    probes: int = 1,
    lexical_weight: float = DEFAULT_LEXICAL_WEIGHT,
    max_new_tokens: int = 24,
    seed: int = 0,
    answers: bool = True,
    data_name: str = "",
) -> dict[str, Any]:
    """Build (if empty) the knowledge base from every row's fact, then route and answer sampled questions
    (`answers=False`: route only, and `loaded` may be None)."""
    if answers and loaded is None:
        raise InvalidInputError("answering needs a model: pass one, or route only (answers=False)")
    if limit is not None and limit < 1:
        raise InvalidInputError(f"limit must be >= 1 (or None: every question), got {limit}")
    facts = [r.fact for r in rows]
    digest = hashlib.sha256(json.dumps(facts).encode()).hexdigest()
    t0 = time.perf_counter()
    built = len(kb) == 0
    if built:
        kb.add(facts, ids=[f"f{i}" for i in range(len(facts))])
        kb.set_label("facts_sha256", digest)
    else:
        _check_same_facts(kb, facts, digest)
    build_s = time.perf_counter() - t0 if built else None
    sample = [i for i, r in enumerate(rows) if r.question.strip()]  # rows without a question only add facts
    if not sample:
        raise InvalidInputError("no row has a question to route")
    random.Random(seed).shuffle(sample)
    sample = sample[: limit or len(rows)]
    t0 = time.perf_counter()
    kb.warm()
    warmup_s = time.perf_counter() - t0
    engine = Engine(loaded) if answers and loaded is not None else None  # None: route only
    settings = GenerationSettings(max_new_tokens=max_new_tokens, stop=("\n",))
    routed_ok = in_top_k = answered = oracle = 0
    overheads: list[float] = []
    route_times: list[float] = []
    for i in tqdm(sample, desc="routing", unit="question"):
        row = rows[i]
        t = time.perf_counter()
        hits = kb.route(row.question, k=k, probes=probes, lexical_weight=lexical_weight)
        route_ms = (time.perf_counter() - t) * 1000
        route_times.append(route_ms)
        routed_ok += bool(hits) and hits[0].id == f"f{i}"
        in_top_k += any(h.id == f"f{i}" for h in hits)
        if engine is None:
            overheads.append(route_ms)
            continue
        text, build_ms = _answer(engine, [h.text for h in hits], row.question, settings)
        overheads.append(route_ms + build_ms)
        answered += row.answer.lower() in text.lower()
        oracle_text, _ = _answer(engine, [row.fact], row.question, settings)
        oracle += row.answer.lower() in oracle_text.lower()
    n = len(sample)
    quantiles = statistics.quantiles(overheads, n=20) if len(overheads) > 1 else overheads * 19
    return {
        "data": data_name,
        "n_facts": len(kb),
        "n_banks": kb.n_banks,
        "n_questions": n,
        "k": k,
        "probes": probes,
        "routing": "hybrid (banked dense + BM25)" if lexical_weight else "dense (banked, as in the paper)",
        "lexical_weight": lexical_weight,
        "routing_dim": kb.routing_dim,
        "store": kb.where,
        "embedder": kb.embedder.name,
        "model": loaded.name if loaded is not None else None,
        "dtype": dtype_name(loaded.dtype) if loaded is not None else None,  # the lazy KV build's precision
        "routing_accuracy": routed_ok / n,
        "answer_fact_in_top_k": in_top_k / n,
        "answer_accuracy": answered / n if answers else None,
        "oracle_answer_accuracy": oracle / n if answers else None,
        "bytes_per_fact": kb.disk_bytes() / len(kb) if kb.disk_bytes() else None,
        "p50_overhead_ms": statistics.median(overheads),
        "p50_route_ms": statistics.median(route_times),
        "p95_overhead_ms": quantiles[18],
        "overhead_includes": "embed + route" + (" + lazy KV build" if answers else ""),
        "build_facts_per_s": len(facts) / build_s if build_s else None,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "machine": machine_info(),
    }
