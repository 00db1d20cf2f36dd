"""Options every command shares (--model, --store, --json, --device, --dtype) and output helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..packet.adapter import shipped_adapter
from ..runtime.loader import LoadedModel, load_model
from ..segments.pack_store import PackStore, default_store_dir


def positive_int(text: str) -> int:
    """An argparse type for counts (rows, tokens, steps): a whole number >= 1, refused by value otherwise,
    so `--limit 0` is a usage error and not an empty run that reports "no rows"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def add_common_args(parser: argparse.ArgumentParser, *, model: bool = True, store: bool = True) -> None:
    """`--json`; the model options (`--model`, `--device`, `--dtype`) for commands that load a language
    model; `--store` for commands that use the pack store. A command never accepts an option it ignores."""
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    if store:
        parser.add_argument(
            "--store",
            type=Path,
            default=None,
            help=f"pack store directory (default: $KVPACK_STORE or {default_store_dir()})",
        )
    if not model:
        return
    parser.add_argument(
        "--model",
        default=None,
        help="hub id, local model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")


DEFAULT_CHROMA_PORT = 8000


def add_chroma_args(
    parser: argparse.ArgumentParser,
    kb_dir_help: str = "embedded Chroma directory (default: $KVPACK_KB)",
    embedder_help: str = "sentence-transformers id or path (default all-MiniLM-L6-v2)",
) -> None:
    """Where a Chroma knowledge base lives: an embedded directory or a server, and its embedder."""
    parser.add_argument("--kb-dir", type=Path, default=None, help=kb_dir_help)
    parser.add_argument("--host", default=None, help="a Chroma server instead of the embedded store")
    parser.add_argument("--port", type=int, default=DEFAULT_CHROMA_PORT)
    parser.add_argument("--embedder", default=None, help=embedder_help)


def quiet_libraries() -> None:
    """Keep library chatter off stdout/stderr so `--json` output stays clean."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def loaded_model(args: argparse.Namespace) -> LoadedModel:
    return load_model(args.model, device=args.device, dtype=args.dtype)


def pack_store(args: argparse.Namespace) -> PackStore:
    return PackStore(args.store)


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """JSON (one line, last on stdout) with --json, readable text otherwise."""
    if args.json:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def add_adapter_arg(parser: argparse.ArgumentParser) -> None:
    """`--packet-adapter` (alias `--adapter`), one meaning wherever an adapter is chosen."""
    parser.add_argument(
        "--packet-adapter",
        "--adapter",
        dest="adapter",
        default=None,
        help="packet adapter .safetensors, or 'none' (default: the one shipped for the model)",
    )


def add_packet_args(parser: argparse.ArgumentParser) -> None:
    """The packet folder and adapter of commands that compose packets (build, ask)."""
    parser.add_argument(
        "--packet-store", type=Path, default=None, help="packet store directory (default $KVPACK_PACKETS)"
    )
    add_adapter_arg(parser)


def adapter_option(value: str | None) -> Path | str | None:
    """What `--packet-adapter` means, as `PacketComposer` takes it: "shipped" when unset, None for 'none'."""
    if value is None:
        return "shipped"
    return None if value == "none" else Path(value).expanduser()


def chosen_adapter(value: str | None, loaded: LoadedModel) -> Path | None:
    """The adapter file `--packet-adapter` names (the shipped one's path when unset; None for 'none')."""
    option = adapter_option(value)
    return shipped_adapter(loaded) if option == "shipped" else (option if isinstance(option, Path) else None)


def refuse_unused(flags: Sequence[tuple[str, bool]], why: str) -> None:
    """Refuse options given (`True` beside the flag) that this invocation would ignore, before any work."""
    given = [flag for flag, used in flags if used]
    if given:
        raise InvalidInputError(f"{', '.join(given)} would be ignored: {why}")


def unused_report(flags: Sequence[tuple[str, bool]], why: str) -> str | None:
    """Options given that the data made useless (known only once the data is read): said, not dropped."""
    given = [flag for flag, used in flags if used]
    return f"{', '.join(given)}: {why}" if given else None
