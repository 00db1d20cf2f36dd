"""`kvpack build FACTS --kb NAME`: cache a fact file as a knowledge pack, or a Chroma knowledge base when large."""

from __future__ import annotations

import argparse
import hashlib
import time
from typing import Any

from ..composition.radix_tree import RadixTree
from ..knowledge.facts import read_facts
from ..knowledge.knowledge_base import KnowledgeBase, default_kb_dir
from ..knowledge.packs import build_pack
from ..packet.composer import PacketComposer, default_packet_dir
from ..prompts.knowledge import DEFAULT_INSTRUCTION, KnowledgeFormat
from ..runtime.device import resolve_dtype
from ..runtime.loader import LoadedModel
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
    writable_directory,
    writing_under,
)

PACKET_METHOD = {"packet": "packet", "blend": "rerotated"}  # --packets blend caches plain (re-rotated) packets


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="cache a facts file (.txt one per line, or .jsonl with fact/text) as a pack")
    p.add_argument("facts", help="facts file")
    p.add_argument("--kb", required=True, help="knowledge-base name")
    p.add_argument(
        "--storage-dtype",
        default=None,
        help="store K/V in float16/bfloat16 to halve disk use (no longer exact for a float32 model: reported)",
    )
    p.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="text placed before the facts")
    p.add_argument(
        "--chroma",
        action="store_true",
        help="build a Chroma knowledge base with k-means banks instead of a pack (automatic when the facts do "
        "not fit the model's context window); KV is then computed lazily for the facts a query routes to",
    )
    add_chroma_args(p)
    p.add_argument(
        "--dims", type=positive_int, default=None, help="store PCA-reduced routing vectors (fewer bytes per fact)"
    )
    p.add_argument(
        "--packets",
        choices=("packet", "blend"),
        default=None,
        help="also cache every fact as a KV Packet (wrapped with the adapter; 'blend': plain) for "
        "composition='packet'/'blend' at query time",
    )
    add_packet_args(p)
    add_common_args(p)
    p.set_defaults(run=run)


def _fits(loaded: LoadedModel, facts: list[str], instruction: str) -> bool:
    """Whether the facts, rendered as one pack, leave room in the context window (a quick token count)."""
    text = KnowledgeFormat(instruction=instruction).system_content(facts)
    return len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) < loaded.context_window - 256


def refuse_unused_options(args: argparse.Namespace) -> None:
    """Options the command line alone shows this build would ignore, refused before any work (as `ask` does);
    those only the facts make useless (Chroma options for facts that fit a pack) are reported instead."""
    chroma_location(args)
    if args.packets is None:
        refuse_unused(
            [("--packet-store", args.packet_store is not None), ("--packet-adapter", args.adapter is not None)],
            "without --packets no packets are built",
        )
    elif args.packets == "blend":
        refuse_unused(
            [("--packet-adapter", args.adapter is not None)],
            "--packets blend caches plain packets (only --packets packet wraps them with an adapter)",
        )
    if args.chroma or args.host:
        refuse_unused(
            [
                ("--instruction", args.instruction != DEFAULT_INSTRUCTION),
                ("--storage-dtype", args.storage_dtype is not None),
            ],
            f"{'--chroma' if args.chroma else '--host'} builds a Chroma knowledge base, which stores facts as text "
            "and answers with the default instruction; these options apply to packs",
        )
        if args.packets is None:
            refuse_unused(
                [
                    ("--model", args.model is not None),
                    ("--device", args.device != "auto"),
                    ("--dtype", args.dtype != "auto"),
                ],
                "a Chroma knowledge base is built without a language model (it loads one only for --packets)",
            )


def packet_composer(args: argparse.Namespace, loaded: LoadedModel) -> PacketComposer | None:
    """The composer `--packets` builds with, its adapter resolved and checked now: a model without a shipped
    adapter, or a bad `--packet-adapter`, fails before the pack or the Chroma base is written."""
    if args.packets is None:
        return None
    method = PACKET_METHOD[args.packets]
    composer = PacketComposer(loaded, args.packet_store, adapter_option(args.adapter) if method == "packet" else None)
    composer.adapter_for(method)  # refuses `packet` with no adapter for this model
    return composer


def build_packets(
    args: argparse.Namespace, composer: PacketComposer | None, facts: list[str], fmt: KnowledgeFormat
) -> dict[str, Any]:
    """Index time for packet composition: every fact cached alone, as a packet, in the packet store."""
    if composer is None:
        return {}
    with writing_under(composer.store):
        built = composer.ensure_facts(facts, fmt, PACKET_METHOD[args.packets], progress=not args.json)
    return {"packets": {"composition": args.packets, "built": built, "store": str(composer.store)}}


def run_chroma(args: argparse.Namespace, facts: list[str], reason: str, composer: PacketComposer | None) -> int:
    t0 = time.perf_counter()
    if args.host is None:
        writable_directory(args.kb_dir or default_kb_dir(), "Chroma directory")
    store = pack_store(args)
    replaced = store.exists(args.kb)
    if replaced:
        writable_directory(store.packs_dir, "pack store")  # the old pack goes: found now, not after the base
    kb = KnowledgeBase(args.kb, args.kb_dir, host=args.host, port=args.port, embedder=args.embedder, dims=args.dims)
    unique = {hashlib.blake2b(f.encode(), digest_size=12).hexdigest(): f for f in facts}  # content-addressed
    ids = list(unique)
    present = kb.existing_ids(ids)
    new = [(i, f) for i, f in unique.items() if i not in present]
    with writing_under(kb.where):
        if new:
            kb.add([f for _, f in new], ids=[i for i, _ in new])
        clustered = len(kb) > 0 and kb.n_banks == 0
        if clustered:  # an earlier build cut short before clustering: every fact is present, and none in a bank
            kb.rebalance(progress=not args.json)
    if replaced:  # the name is the Chroma base now: `kvpack ask --kb` must not answer from the old pack
        store.delete(args.kb)
    seconds = time.perf_counter() - t0
    payload = {
        "kb": args.kb,
        "backend": "chroma",
        "reason": reason,
        "facts": len(kb),
        "added": len(new),
        "already_present": len(present),
        "duplicates_in_file": len(facts) - len(unique),
        "replaced_pack": replaced,
        "banks": kb.n_banks,
        "reclustered": clustered,  # the facts of a build cut short before clustering
        "bytes": kb.disk_bytes(),
        "seconds": round(seconds, 3),
        "embedder": kb.embedder.name,
        "store": kb.where,
        **build_packets(args, composer, facts, KnowledgeFormat()),  # the layout `ask` routes Chroma facts in
    }
    unused = [
        flag
        for flag, given in (
            ("--instruction", args.instruction != DEFAULT_INSTRUCTION),
            ("--storage-dtype", args.storage_dtype is not None),
        )
        if given
    ]
    if unused:  # pack options given, but the facts went to Chroma: say so rather than drop them silently
        payload["ignored"] = (
            f"{', '.join(unused)}: a Chroma knowledge base stores facts as text and answers with the default "
            "instruction; these options apply to packs"
        )
    emit(
        args,
        payload,
        f"built Chroma knowledge base {args.kb!r} ({reason}): {len(kb)} facts in {kb.n_banks} "
        f"banks in {seconds:.1f} s\nstore: {kb.where}" + (f"\nignored {payload['ignored']}" if unused else ""),
    )
    return 0


def run(args: argparse.Namespace) -> int:
    refuse_unused_options(args)
    facts = read_facts(args.facts)
    if args.packets is not None:
        writable_directory(args.packet_store or default_packet_dir(), "packet store")
    if args.chroma or args.host:
        loaded = loaded_model(args) if args.packets is not None else None  # a Chroma base alone needs no model
        return run_chroma(args, facts, "asked for", packet_composer(args, loaded) if loaded is not None else None)
    store = pack_store(args)
    writable_directory(store.packs_dir, "pack store")  # before the model loads and the pack is computed
    loaded = loaded_model(args)
    composer = packet_composer(args, loaded)  # before anything is written
    if not _fits(loaded, facts, args.instruction):
        reason = f"the facts exceed {loaded.name}'s context window of {loaded.context_window}"
        return run_chroma(args, facts, reason, composer)
    unused = [
        flag
        for flag, value in (("--kb-dir", args.kb_dir), ("--embedder", args.embedder), ("--dims", args.dims))
        if value
    ]
    storage = resolve_dtype(args.storage_dtype, loaded.device) if args.storage_dtype else None
    with writing_under(store.packs_dir):
        report = build_pack(
            loaded,
            RadixTree(loaded.fingerprint),
            store,
            args.kb,
            facts,
            fmt=KnowledgeFormat(instruction=args.instruction),
            storage_dtype=storage,
        )
    m = report.manifest
    payload = {
        "kb": m.name,
        "facts": len(m.facts),
        "tokens": m.token_count,
        "segments": len(m.segment_ids),
        "bytes": report.bytes_on_disk,
        "seconds": round(report.seconds, 3),
        "storage_dtype": m.storage_dtype,
        "exact": m.lossless,
        "model": m.model_name,
        "store": str(store.root),
        **build_packets(args, composer, list(m.facts), m.knowledge_format),
    }
    if unused:  # Chroma options given, but the facts fit one pack: say so rather than drop them silently
        payload["ignored"] = f"{', '.join(unused)}: the facts fit a pack; add --chroma for a Chroma knowledge base"
    note = "" if m.lossless else f" (stored in {m.storage_dtype}: approximate, not exact)"
    emit(
        args,
        payload,
        f"built {m.name!r}: {len(m.facts)} facts, {m.token_count} tokens, {len(m.segment_ids)} segments, "
        f"{report.bytes_on_disk / 1e6:.1f} MB in {report.seconds:.1f} s{note}\nstore: {store.root}"
        + (f"\nignored {payload['ignored']}" if unused else ""),
    )
    return 0
