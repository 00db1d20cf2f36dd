"""`kvpack list`: the knowledge bases in a store."""

from __future__ import annotations

import argparse

from ..errors import CorruptSegmentError
from .common import add_common_args, emit, pack_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the knowledge bases in the store")
    add_common_args(p)
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
                "bytes": store.size_bytes(name),
            }
        )
    text = (
        "\n".join(
            f"{r['kb']}: damaged ({r['error']})"
            if "error" in r
            else f"{r['kb']}: {r['facts']} facts, {r['tokens']} tokens, {r['model']}, {r['storage_dtype']}"
            for r in rows
        )
        or f"no knowledge bases in {store.root}"
    )
    emit(args, {"store": str(store.root), "knowledge_bases": rows}, text)
    return 0
