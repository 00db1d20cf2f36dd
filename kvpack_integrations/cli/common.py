"""Options every command shares (--model, --store, --json, --device, --dtype) and output helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..packet.adapter import shipped_adapter
from ..runtime.loader import LoadedModel, load_model
from ..runtime.paths import usable_directory
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
    add_chroma_location_args(parser, kb_dir_help)
    parser.add_argument("--embedder", default=None, help=embedder_help)


def add_chroma_location_args(
    parser: argparse.ArgumentParser, kb_dir_help: str = "embedded Chroma directory (default: $KVPACK_KB)"
) -> None:
    """`--kb-dir`, or `--host` and `--port`: call `chroma_location` before using them."""
    parser.add_argument("--kb-dir", type=Path, default=None, help=kb_dir_help)
    parser.add_argument("--host", default=None, help="a Chroma server instead of the embedded store")
    parser.add_argument(
        "--port", type=int, default=None, help=f"the Chroma server's port (default {DEFAULT_CHROMA_PORT})"
    )


def chroma_location(args: argparse.Namespace) -> bool:
    """Refuse `--port` without `--host` (the embedded store has no port) and `--kb-dir` with `--host` (a server
    keeps its own directory), then fill in the default port; returns whether `--port` was given."""
    refuse_unused(
        [("--port", args.port is not None and args.host is None)], "without --host there is no Chroma server to reach"
    )
    refuse_unused(
        [("--kb-dir", args.kb_dir is not None and args.host is not None)],
        "--host uses the Chroma server's own directory",
    )
    given = args.port is not None
    if not given:
        args.port = DEFAULT_CHROMA_PORT
    return given


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


def writable_directory(path: str | Path, what: str) -> Path:
    """`path` as a folder this process can write in (it, or the folder it would be made in), checked before
    a model loads: a read-only store is refused by name up front, not as an OS error after the work."""
    path = usable_directory(path, what)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        if existing == path:
            raise InvalidInputError(f"the {what} {path} is not writable")
        raise InvalidInputError(f"the {what} {path} cannot be created: {existing} is not writable")
    return path


def os_error_message(exc: OSError) -> str:
    """One line for an error of the system (permission denied, disk full): the reason and the path(s)."""
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    reason = exc.strerror or str(exc)
    return f"{reason}: {' -> '.join(paths)}" if paths else reason


@contextmanager
def writing_under(path: str | Path) -> Iterator[None]:
    """Name `path` in an OS error raised while writing under it that names no file (a write to a full disk
    names none), so the one-line error says where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc  # the errno picks the subclass


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
