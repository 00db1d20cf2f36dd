"""`kvpack build FACTS --kb NAME`: cache a fact file as a knowledge pack."""

from __future__ import annotations

import argparse

from ..composition.radix_tree import RadixTree
from ..knowledge.facts import read_facts
from ..knowledge.packs import build_pack
from ..prompts.knowledge import DEFAULT_INSTRUCTION, KnowledgeFormat
from ..runtime.device import resolve_dtype
from .common import add_common_args, emit, loaded_model, pack_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="cache a facts file (.txt one per line, or .jsonl with fact/text) as a pack")
    p.add_argument("facts", help="facts file")
    p.add_argument("--kb", required=True, help="knowledge-base name")
    p.add_argument(
        "--storage-dtype",
        default=None,
        help="store K/V in float16/bfloat16 to halve disk use (no longer exact for a float32 model: reported)",
    )
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="text placed before the facts")
    add_common_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    facts = read_facts(args.facts)
    loaded = loaded_model(args)
    store = pack_store(args)
    storage = resolve_dtype(args.storage_dtype, loaded.device) if args.storage_dtype else None
    report = build_pack(
        loaded,
        RadixTree(loaded.fingerprint),
        store,
        args.kb,
        facts,
        fmt=KnowledgeFormat(instruction=args.instruction),
        storage_dtype=storage,
    )
    m = report.manifest
    payload = {
        "kb": m.name,
        "facts": len(m.facts),
        "tokens": m.token_count,
        "segments": len(m.segment_ids),
        "bytes": report.bytes_on_disk,
        "seconds": round(report.seconds, 3),
        "storage_dtype": m.storage_dtype,
        "exact": m.lossless,
        "model": m.model_name,
        "store": str(store.root),
    }
    note = "" if m.lossless else f" (stored in {m.storage_dtype}: approximate, not exact)"
    emit(
        args,
        payload,
        f"built {m.name!r}: {len(m.facts)} facts, {m.token_count} tokens, {len(m.segment_ids)} segments, "
        f"{report.bytes_on_disk / 1e6:.1f} MB in {report.seconds:.1f} s{note}\nstore: {store.root}",
    )
    return 0
