"""`kvpack list`: the knowledge bases in a pack store, and those in a Chroma store."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CorruptSegmentError
from ..knowledge.knowledge_base import default_kb_dir, list_knowledge_bases
from .common import add_common_args, emit, pack_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the knowledge bases: packs in the store, and Chroma knowledge bases")
    add_common_args(p, model=False)
    p.add_argument("--kb-dir", type=Path, default=None, help="embedded Chroma directory (default: $KVPACK_KB)")
    p.add_argument("--host", default=None, help="a Chroma server instead of the embedded store")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    store = pack_store(args)
    rows = []
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
    where = f"{args.host}:{args.port}" if args.host else str(args.kb_dir or default_kb_dir())
    chroma = list_knowledge_bases(args.kb_dir, host=args.host, port=args.port)
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
    payload = {"store": str(store.root), "knowledge_bases": rows, "chroma": where, "chroma_knowledge_bases": chroma}
    emit(args, payload, "\n".join(lines))
    return 0
