"""`kvpack synthesize N --output FILE`: a seeded synthetic fact set (fictional entities) for benchmarks."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..knowledge.synthetic import write_synthetic
from .common import emit, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synthesize", help="write N synthetic {fact, question, answer} rows as JSONL")
    p.add_argument("n", type=positive_int, help="number of facts")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = write_synthetic(args.output, args.n, args.seed)
    emit(args, {"output": str(path), "n": args.n, "seed": args.seed}, f"wrote {args.n} facts to {path}")
    return 0
