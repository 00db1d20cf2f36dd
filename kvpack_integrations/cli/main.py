"""The `kvpack` command line: build, ask, list, eval, demo (`--json` everywhere)."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import KVPackError
from . import ask, build, demo, evaluate, list_packs, packet, rebalance, steer, synthesize
from .common import quiet_libraries


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpack", description="Knowledge as pre-computed KV-cache segments for local transformers models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (build, ask, list_packs, evaluate, demo, synthesize, steer, rebalance, packet):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    quiet_libraries()
    try:
        return int(args.run(args))
    except KVPackError as exc:
        if getattr(args, "json", False):
            sys.stdout.write(json.dumps({"error": str(exc), "type": type(exc).__name__}) + "\n")
        sys.stderr.write(f"kvpack: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
