"""`kvpack ask QUESTION --kb NAME [--mode kv|rag|packet|blend]`: answer from a pack (exact), from the same
facts as text, or from the facts' packets (approximate)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..engine.engine import Engine
from ..engine.settings import GenerationSettings
from ..errors import InvalidInputError
from ..knowledge.packs import knowledge_prompt, load_pack
from ..packet.composer import PacketComposer
from ..packet.layout import packet_prompt
from .common import add_common_args, emit, loaded_model, pack_store
from .steer import parse_steer_option


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="answer a question with a knowledge base")
    p.add_argument("question")
    p.add_argument("--kb", required=True, help="knowledge-base name")
    p.add_argument(
        "--mode",
        choices=("kv", "rag", "packet", "blend"),
        default="kv",
        help="kv: reuse the pack (exact); rag: facts as text; packet/blend: facts composed from stored packets "
        "(approximate; built on first use, or at index time with `kvpack build --packets`)",
    )
    p.add_argument("--packet-store", type=Path, default=None, help="packet store directory (default $KVPACK_PACKETS)")
    p.add_argument("--packet-adapter", type=Path, default=None, help="packet adapter (default: the shipped one)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument(
        "--steer", action="append", default=[], metavar="FILE[:ALPHA]", help="apply a steering vector (repeatable)"
    )
    add_common_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise InvalidInputError("the question is empty")
    store = pack_store(args)
    manifest = store.manifest(args.kb)  # unknown kb fails before the model loads
    loaded = loaded_model(args)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    steering = [parse_steer_option(spec, loaded.fingerprint) for spec in args.steer]
    engine = Engine(loaded)
    t0 = time.perf_counter()
    if args.mode == "kv":
        manifest = load_pack(loaded, engine.tree, store, args.kb)
    if args.mode in ("packet", "blend"):
        if manifest.raw:
            raise InvalidInputError(f"pack {args.kb!r} is raw (untemplated): it cannot be composed from packets")
        composer = PacketComposer(loaded, args.packet_store, args.packet_adapter or "shipped")
        split = packet_prompt(loaded.tokenizer, manifest.facts, args.question, manifest.knowledge_format)
        composed = composer.compose(engine, split, args.mode).composed
        chunks = engine.stream(list(split.tail), settings, composed=composed, started_at=t0, steering=steering)
    else:
        prompt = knowledge_prompt(
            loaded.tokenizer, manifest.facts, args.question, manifest.knowledge_format, raw=manifest.raw
        )
        strategy = "exact" if args.mode == "kv" else "text"
        chunks = engine.stream(prompt.token_ids, settings, strategy=strategy, started_at=t0, steering=steering)
    parts, usage, finish = [], None, None
    for chunk in chunks:
        parts.append(chunk.text)
        if args.stream and not args.json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        if chunk.usage is not None:
            usage, finish = chunk.usage, chunk.finish_reason
    assert usage is not None
    answer = "".join(parts)
    if args.stream and not args.json:
        sys.stdout.write("\n")
    payload = {
        "answer": answer,
        "mode": args.mode,
        "kb": args.kb,
        "finish_reason": finish,
        "usage": usage.to_dict(),
        "model": loaded.name,
    }
    text = "" if args.stream else answer
    text += (
        f"\n[{args.mode}] {usage.input_tokens} input tokens: {usage.cached_tokens} from cache, "
        f"{usage.prefilled_tokens} prefilled; TTFT {usage.ttft_ms:.0f} ms; "
        f"{'exact' if usage.exact else 'approximate'}"
    )
    emit(args, payload, text)
    return 0
