"""`kvpack rebalance --kb NAME [--banks N]`: re-cluster a Chroma knowledge base's banks (after many adds)."""

from __future__ import annotations

import argparse
import time

from ..knowledge.knowledge_base import KnowledgeBase
from .common import add_chroma_args, chroma_location, emit, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rebalance", help="re-cluster a Chroma knowledge base into k-means banks")
    p.add_argument("--kb", required=True, help="knowledge-base name")
    p.add_argument(
        "--banks", type=positive_int, default=None, help="number of banks (default: ceil(facts / bank size))"
    )
    add_chroma_args(p, embedder_help="the embedder the knowledge base was built with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    chroma_location(args)
    kb = KnowledgeBase(args.kb, args.kb_dir, host=args.host, port=args.port, embedder=args.embedder, create=False)
    before = kb.n_banks
    t0 = time.perf_counter()
    banks = kb.rebalance(args.banks, seed=args.seed)
    seconds = time.perf_counter() - t0
    payload = {"kb": args.kb, "facts": len(kb), "banks_before": before, "banks": banks, "seconds": round(seconds, 3)}
    emit(args, payload, f"{args.kb}: {len(kb)} facts re-clustered from {before} into {banks} banks in {seconds:.1f} s")
    return 0
