"""`kvpack list`: the knowledge bases in a pack store, and those in a Chroma store."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import CorruptSegmentError, KnowledgeBaseUnavailableError
from ..knowledge.knowledge_base import default_kb_dir, list_knowledge_bases
from ..runtime.paths import usable_directory
from ..segments.pack_store import PackStore
from .common import add_chroma_location_args, add_common_args, chroma_location, emit, pack_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the knowledge bases: packs in the store, and Chroma knowledge bases")
    add_common_args(p, model=False)
    add_chroma_location_args(p)
    p.set_defaults(run=run)


def _pack_rows(store: PackStore) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in store.names():
        try:
            m = store.manifest(name)
        except CorruptSegmentError as exc:  # one damaged pack does not hide the others
            rows.append({"kb": name, "error": str(exc), "bytes": store.size_bytes(name)})
            continue
        rows.append(
            {
                "kb": name,
                "facts": len(m.facts),
                "tokens": m.token_count,
                "model": m.model_name,
                "storage_dtype": m.storage_dtype,
                "computed_on": m.computed_on,
                "bytes": store.size_bytes(name),
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    """Exit code 2, with `chroma_error`, when the Chroma server cannot be reached: the packs are still listed."""
    chroma_location(args)
    if args.host is None:  # a file where the Chroma directory should be holds no knowledge base: said, not empty
        usable_directory(args.kb_dir or default_kb_dir(), "Chroma directory")
    store = pack_store(args)
    rows = _pack_rows(store)
    where = f"{args.host}:{args.port}" if args.host else str(args.kb_dir or default_kb_dir())
    chroma: list[dict[str, Any]] = []
    chroma_error = None
    try:
        chroma = list_knowledge_bases(args.kb_dir, host=args.host, port=args.port)
    except KnowledgeBaseUnavailableError as exc:  # a dead server hides no pack
        chroma_error = str(exc)
    lines = [
        f"{r['kb']}: damaged ({r['error']})"
        if "error" in r
        else (
            f"{r['kb']}: {r['facts']} facts, {r['tokens']} tokens, {r['model']}, {r['storage_dtype']}, "
            f"computed on {r['computed_on']}"
        )
        for r in rows
    ] or [f"no knowledge bases in {store.root}"]
    lines += [
        f"{r['kb']}: {r['facts']} facts in {r['banks']} banks, Chroma at {where} ({r['embedder']})" for r in chroma
    ]
    if chroma_error is not None:
        lines.append(f"Chroma knowledge bases not listed: {chroma_error}")
    payload: dict[str, Any] = {
        "store": str(store.root),
        "knowledge_bases": rows,
        "chroma": where,
        "chroma_knowledge_bases": chroma,
        **({"chroma_error": chroma_error} if chroma_error is not None else {}),
    }
    emit(args, payload, "\n".join(lines))
    return 2 if chroma_error is not None else 0
