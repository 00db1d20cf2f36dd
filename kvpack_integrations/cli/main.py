"""The `kvpack` command line: build, ask, list, eval, demo (`--json` everywhere)."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Any, NoReturn

from ..errors import KVPackError
from . import ask, build, demo, evaluate, list_packs, packet, rebalance, steer, synthesize
from .common import os_error_message, quiet_libraries


def make_parser(json_errors: bool = False) -> argparse.ArgumentParser:
    """The parser; with `json_errors`, a usage error also prints the `{"error", "type"}` line --json promises."""

    class Parser(argparse.ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # no abbreviated options (`--jso`): `main` finds --json by its whole name, as do users' scripts
            super().__init__(*args, **{**kwargs, "allow_abbrev": False})

        def error(self, message: str) -> NoReturn:
            if json_errors:
                sys.stdout.write(json.dumps({"error": message, "type": "UsageError"}) + "\n")
            super().error(message)

    parser = Parser(
        prog="kvpack", description="Knowledge as pre-computed KV-cache segments for local transformers models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (build, ask, list_packs, evaluate, demo, synthesize, steer, rebalance, packet):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    args = make_parser(json_errors="--json" in arguments).parse_args(arguments)
    quiet_libraries()
    wants_json = getattr(args, "json", False)
    try:
        return int(args.run(args))
    except KVPackError as exc:
        if wants_json:
            sys.stdout.write(json.dumps({"error": str(exc), "type": type(exc).__name__}) + "\n")
        sys.stderr.write(f"kvpack: error: {exc}\n")
        return 2
    except OSError as exc:
        # the system refused (a read-only folder, a full disk): one line naming the path, not a traceback
        message = os_error_message(exc)
        if wants_json:
            sys.stdout.write(json.dumps({"error": message, "type": type(exc).__name__}) + "\n")
        sys.stderr.write(f"kvpack: error: {message}\n")
        return 1
    except Exception as exc:
        if not wants_json:
            raise
        # not one of ours (a bug, a library's or the system's error): --json still ends with one JSON line
        traceback.print_exc()
        sys.stdout.write(json.dumps({"error": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__}) + "\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
