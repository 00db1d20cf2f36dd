"""`kvpack ask QUESTION --kb NAME [--mode kv|rag|packet|blend]`: answer from a pack (exact), from the same
facts as text, or from the facts' packets (approximate). A name that is a Chroma knowledge base rather
than a pack (`kvpack build` makes one for facts past the context window) is routed first: its `--k`
best facts are the knowledge, their KV computed now (exact, as a pack would hold it)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..engine.engine import Engine
from ..engine.settings import GenerationSettings
from ..errors import InvalidInputError, UnknownKnowledgeBaseError
from ..knowledge.knowledge_base import KnowledgeBase
from ..knowledge.packs import knowledge_prompt, load_pack
from ..packet.composer import PacketComposer
from ..packet.layout import packet_prompt
from ..prompts.knowledge import KnowledgeFormat
from ..segments.pack_store import PackManifest, PackStore
from .common import (
    adapter_option,
    add_chroma_args,
    add_common_args,
    add_packet_args,
    chroma_location,
    emit,
    loaded_model,
    pack_store,
    positive_int,
    refuse_unused,
    unused_report,
)
from .steer import parse_steer_option

DEFAULT_K = 4


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
    add_packet_args(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling (default 1: off); needs --temperature > 0"
    )
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible; needs --temperature > 0")
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument(
        "--steer", action="append", default=[], metavar="FILE[:ALPHA]", help="apply a steering vector (repeatable)"
    )
    p.add_argument(
        "--k", type=positive_int, default=DEFAULT_K, help="facts routed to the question (Chroma knowledge bases)"
    )
    add_chroma_args(p)
    add_common_args(p)
    p.set_defaults(run=run)


def _knowledge(args: argparse.Namespace, store: PackStore) -> tuple[PackManifest | None, list[dict[str, Any]]]:
    """The pack named `--kb`, else the facts its Chroma knowledge base routes the question to."""
    if store.exists(args.kb):
        return store.manifest(args.kb), []
    try:
        kb = KnowledgeBase(args.kb, args.kb_dir, host=args.host, port=args.port, embedder=args.embedder, create=False)
    except UnknownKnowledgeBaseError:
        known = ", ".join(store.names()) or "none"
        raise UnknownKnowledgeBaseError(
            f"no knowledge base named {args.kb!r}: no pack in {store.root} (known: {known}) and no Chroma "
            f"knowledge base in {args.host or args.kb_dir or 'the default Chroma directory'}; build it with "
            "`kvpack build`"
        ) from None
    hits = kb.route(args.question, k=args.k)
    return None, [{"id": h.id, "text": h.text, "score": round(h.score, 4)} for h in hits]


def run(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise InvalidInputError("the question is empty")
    refuse_unused([("--stream", args.stream and args.json)], "--json prints one line once the answer is complete")
    if args.mode in ("kv", "rag"):
        packet_options = [
            ("--packet-store", args.packet_store is not None),
            ("--packet-adapter", args.adapter is not None),
        ]
        refuse_unused(packet_options, f"--mode {args.mode} composes no packets (they apply to packet and blend)")
    elif args.mode == "blend":
        refuse_unused(
            [("--packet-adapter", args.adapter is not None)],
            "--mode blend composes plain packets (only --mode packet wraps them with an adapter)",
        )
    if args.temperature == 0:
        sampling = [("--top-p", args.top_p is not None), ("--seed", args.seed is not None)]
        refuse_unused(sampling, "--temperature 0 decodes greedily (give a --temperature > 0 to sample)")
    port_given = chroma_location(args)
    store = pack_store(args)
    manifest, routed = _knowledge(args, store)  # an unknown kb fails before the model loads
    ignored = None
    if manifest is not None:  # the name is a pack: Chroma routing options given for it are said, not dropped
        chroma_options = [
            ("--k", args.k != DEFAULT_K),
            ("--kb-dir", args.kb_dir is not None),
            ("--host", args.host is not None),
            ("--port", port_given),
            ("--embedder", args.embedder is not None),
        ]
        ignored = unused_report(chroma_options, f"{args.kb!r} is a pack, so nothing is routed")
    facts = list(manifest.facts) if manifest is not None else [r["text"] for r in routed]
    fmt = manifest.knowledge_format if manifest is not None else KnowledgeFormat()
    raw = manifest.raw if manifest is not None else False
    loaded = loaded_model(args)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0 if args.top_p is None else args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    steering = [parse_steer_option(spec, loaded.fingerprint) for spec in args.steer]
    engine = Engine(loaded)
    t0 = time.perf_counter()
    if args.mode == "kv" and manifest is not None:
        load_pack(loaded, engine.tree, store, args.kb)
    if args.mode in ("packet", "blend"):
        if raw:
            raise InvalidInputError(f"pack {args.kb!r} is raw (untemplated): it cannot be composed from packets")
        adapter = adapter_option(args.adapter) if args.mode == "packet" else None  # blend wraps nothing
        composer = PacketComposer(loaded, args.packet_store, adapter)
        split = packet_prompt(loaded.tokenizer, facts, args.question, fmt)
        composed = composer.compose(engine, split, args.mode).composed
        chunks = engine.stream(list(split.tail), settings, composed=composed, started_at=t0, steering=steering)
    else:
        prompt = knowledge_prompt(loaded.tokenizer, facts, args.question, fmt, raw=raw)
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
        **({"backend": "chroma", "routed": routed} if manifest is None else {}),
        **({"ignored": ignored} if ignored else {}),
    }
    text = "" if args.stream else answer
    text += (
        f"\n[{args.mode}] {usage.input_tokens} input tokens: {usage.cached_tokens} from cache, "
        f"{usage.prefilled_tokens} prefilled; TTFT {usage.ttft_ms:.0f} ms; "
        f"{'exact' if usage.exact else 'approximate'}"
    )
    # what the usage report says about the answer (segments computed elsewhere, stored packets replaced)
    # reaches text users too: one line each after the usage line, so the answer above stays as it was
    text += "".join(f"\nnote: {note}" for note in usage.notes)
    text += f"\nignored {ignored}" if ignored else ""
    emit(args, payload, text)
    return 0
