"""Composing a prompt's documents from stored packet caches: one code path for the product and the eval.

A `PacketComposer` owns a packet store (one fingerprinted file per document and adapter) and an
adapter. For a `PacketPrompt` it takes the preamble from the engine's exact prefix tree, loads every
document's packet from the store (computing and storing the ones it lacks, so the next query finds
them), lays them out with keys re-rotated to their offsets, and, for the selective-recompute
methods, recomputes the chosen document tokens. What it returns is a cache for the appended
strategies: the prompt's tail is prefilled on top of it.

Methods: `packet` (adapter-wrapped, nothing recomputed), `rerotated` (plain, nothing recomputed),
`blend` (plain, the ~15% of document tokens whose layer-1 values deviate most recomputed, as in
CacheBlend), `epic` (plain, the first k tokens of every document recomputed, as in EPIC), `naive`
(plain, every document left at positions 0..n). All are approximate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..composition.cache_ops import check_sliding_window, forward, segments_from_cache
from ..composition.composed import ComposedCache
from ..composition.rope import rope_spec
from ..errors import InvalidInputError
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.default_model import kvpack_home
from ..runtime.loader import LoadedModel
from ..runtime.paths import usable_directory
from .adapter import PacketAdapter, shipped_adapter
from .compose import PACKET_REMEDY, PacketCache, cache_packet, compose_packets, wrapped_length
from .layout import PacketPrompt, document_ids
from .recompute import recompute_positions, value_deviation
from .resident import ResidentPackets
from .store import Damage, adapter_id, iter_packets, packet_on_device, packet_path, save_packet

if TYPE_CHECKING:
    from ..engine.engine import Engine

PACKET_METHODS = ("packet", "rerotated", "blend", "epic", "naive")


@dataclass
class LoadReport:
    """What loading a query's packets did besides reading them: documents cached now (their indices),
    refused files replaced (why), packets the store could not take (where, why)."""

    built: list[int] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unstored: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        out = []
        if self.replaced:
            first = self.replaced[0]
            out.append(f"{len(self.replaced)} stored packet files were refused and replaced (first: {first})")
        if self.unstored:
            out.append(
                f"{len(self.unstored)} packets could not be stored and were used unstored, so they are computed "
                f"again next time (first: {self.unstored[0]})"
            )
        return out


def default_packet_dir() -> Path:
    """`$KVPACK_PACKETS`, else `packets/` under the kvpack home; empty counts as unset (not the current folder)."""
    env = os.environ.get("KVPACK_PACKETS", "")
    return Path(env).expanduser() if env.strip() else kvpack_home() / "packets"


def megabytes_from_env(name: str) -> int:
    """`$name` megabytes in bytes (0 when unset); anything but a number >= 0 is refused by name."""
    raw = os.environ.get(name, "").strip()
    try:
        megabytes = float(raw) if raw else 0.0
    except ValueError:
        megabytes = math.nan
    if not math.isfinite(megabytes) or megabytes < 0:
        raise InvalidInputError(f"{name} must be a number of megabytes >= 0, got {raw!r}")
    return int(megabytes * 2**20)


def default_resident_bytes() -> int:
    """`$KVPACK_PACKET_RESIDENT_MB` in bytes (0 when unset)."""
    return megabytes_from_env("KVPACK_PACKET_RESIDENT_MB")


def default_host_bytes() -> int:
    """`$KVPACK_PACKET_HOST_MB` in bytes (0 when unset)."""
    return megabytes_from_env("KVPACK_PACKET_HOST_MB")


@dataclass
class PacketComposition:
    """A composed cache for the documents (tail still to prefill) and what composing it took."""

    composed: ComposedCache
    recomputed_tokens: int  # document tokens whose K/V was computed at query time
    selection_tokens: int  # tokens run through the first layers to choose them (blend)
    packets_built: int  # documents the store lacked, cached now (and stored)


class PacketComposer:
    """Packet caches of documents in a store, composed into a prompt's cache without recomputing them.

    `adapter`: a `PacketAdapter`, a path to one, or `"shipped"` (the adapter trained for this model and
    shipped in the package; None if there is none, and then only the plain methods work).
    `resident_bytes`: keep up to this many bytes of packets on the model's device between queries
    (least recently used dropped first), so documents composed again skip the store; 0 keeps none;
    None: `$KVPACK_PACKET_RESIDENT_MB` megabytes, else none.
    `host_bytes`: keep up to this many bytes of packets, as read and checked, in host memory between
    queries (page-locked on a GPU machine), so a packet dropped from the device, or never kept there,
    costs only its copy to the device, not its file; 0 keeps none; None: `$KVPACK_PACKET_HOST_MB`
    megabytes, else none. Both tiers are least recently used first out, and hold what they were given
    (packets are named by content: a kept packet never goes stale).
    `load_threads`: packet files read at once (None: 16 on a GPU, bounded by the cores; 1 on a CPU).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        store: str | Path | None = None,
        adapter: PacketAdapter | str | Path | None = "shipped",
        *,
        blend_ratio: float = 0.15,
        epic_tokens: int = 8,
        resident_bytes: int | None = None,
        host_bytes: int | None = None,
        load_threads: int | None = None,
    ) -> None:
        if not 0 < blend_ratio <= 1:
            raise InvalidInputError(f"blend_ratio must be in (0, 1], got {blend_ratio}")
        if epic_tokens < 1:
            raise InvalidInputError(f"epic_tokens must be >= 1, got {epic_tokens}")
        self.loaded = loaded
        self.store = usable_directory(store if store is not None else default_packet_dir(), "packet store")
        if adapter == "shipped":
            path = shipped_adapter(loaded)
            adapter = PacketAdapter.load(path, loaded.fingerprint) if path is not None else None
        elif isinstance(adapter, (str, Path)):
            adapter = PacketAdapter.load(adapter, loaded.fingerprint)
        if adapter is not None:
            adapter.check_model(loaded)
        self.adapter: PacketAdapter | None = adapter
        self.blend_ratio = blend_ratio
        self.epic_tokens = epic_tokens
        self.resident = ResidentPackets(default_resident_bytes() if resident_bytes is None else resident_bytes)
        self.host = ResidentPackets(default_host_bytes() if host_bytes is None else host_bytes, where="host")
        if load_threads is not None and load_threads < 1:
            raise InvalidInputError(f"load_threads must be >= 1, got {load_threads}")
        self.load_threads = load_threads
        self.spec = rope_spec(loaded)  # refuses RoPE variants that cannot be re-rotated, up front

    def adapter_for(self, method: str) -> PacketAdapter | None:
        """The adapter a method wraps documents with (only `packet` uses one)."""
        if method not in PACKET_METHODS:
            raise InvalidInputError(f"unknown packet method {method!r}: use one of {', '.join(PACKET_METHODS)}")
        if method != "packet":
            return None
        if self.adapter is None:
            raise InvalidInputError(
                f"no packet adapter for {self.loaded.name}: train one with `kvpack packet train` and pass it "
                "(or use composition='blend', which needs none)"
            )
        return self.adapter

    def ensure(self, documents: Sequence[Sequence[int]], method: str = "packet") -> int:
        """Cache and store every document the store lacks (index time); returns how many were built."""
        adapter = self.adapter_for(method)
        key, built = adapter_id(adapter), 0
        for document in documents:
            path = packet_path(self.store, document, key, self.loaded.fingerprint)
            if not path.is_file():
                save_packet(path, cache_packet(self.loaded, adapter, document), self.loaded.fingerprint, key)
                built += 1
        return built

    def ensure_facts(
        self, facts: Sequence[str], fmt: KnowledgeFormat, method: str = "packet", *, progress: bool = False
    ) -> int:
        """Index time: packets for knowledge facts as `fmt` places them in a prompt; returns how many were built."""
        tokenizer = self.loaded.tokenizer
        documents = [document_ids(tokenizer, f, fmt) for f in tqdm(facts, desc="packets", disable=not progress)]
        return self.ensure(documents, method)

    def store_retrieved(
        self, texts: Sequence[str], composition: str, fmt: KnowledgeFormat | None = None
    ) -> dict[str, Any]:
        """Retrieval time: the packets a `packet` or `blend` request will compose these texts from.

        Packets are keyed by the documents' tokens in the prompt, which depend on the knowledge format:
        they are built in `fmt` (default: the default layout), so the chat model must use the same one.
        Returns the record a retriever puts on each hit (where they are, which adapter, built now?).
        """
        if composition not in ("packet", "blend"):
            raise InvalidInputError(f"unknown packet composition {composition!r}: use packet or blend")
        method = "packet" if composition == "packet" else "rerotated"
        built = self.ensure_facts(texts, fmt or KnowledgeFormat(), method)
        adapter = adapter_id(self.adapter_for(method))
        return {"composition": composition, "store": str(self.store), "adapter": adapter, "built_now": built > 0}

    def load(self, documents: Sequence[Sequence[int]], method: str) -> tuple[list[PacketCache], int]:
        """Every document's packet: resident, else from the store, else built and stored; (packets, built)."""
        report = LoadReport()
        return list(self.stream(documents, method, report)), len(report.built)

    def stream(
        self, documents: Sequence[Sequence[int]], method: str, report: LoadReport
    ) -> Generator[PacketCache, None, None]:
        """`load` as a stream, in document order: resident packets at once, stored ones from the host tier
        or as their files are read (`iter_packets`: on a GPU, several files at once, each copied to the
        device as soon as it is read), missing ones cached now and stored (`report.built`). A stored file
        that is refused (damaged, cut short, another document's or adapter's, another model's) holds only
        a cache of its document: the packet is cached again and the file replaced (`report.replaced`). A
        packet the store cannot take (read-only, full) is used all the same (`report.unstored`)."""
        adapter = self.adapter_for(method)
        fingerprint = self.loaded.fingerprint
        key = adapter_id(adapter)  # once per query: hashing the soft tokens per document costs ms on an 8B model
        paths = [packet_path(self.store, document, key, fingerprint) for document in documents]
        found = {i: packet for i, path in enumerate(paths) if (packet := self.resident.get(path)) is not None}
        first = {path: i for i, path in reversed(list(enumerate(paths)))}  # each path's first position
        host = self.host if self.host.budget_bytes else None
        wanted = [i for i, path in enumerate(paths) if i not in found and first[path] == i]
        # taken from host memory now, not when their turn comes: this query's own reads may evict them
        held = {i: packet for i in wanted if host is not None and (packet := host.get(paths[i])) is not None}
        stored = {i for i in wanted if i not in held and paths[i].is_file()}
        requests = [(paths[i], documents[i]) for i in sorted(stored)]
        device, dtype, threads = self.loaded.device, self.loaded.dtype, self.load_threads
        rebuilt: set[Path] = set()

        def build(path: Path, document: Sequence[int]) -> PacketCache:
            packet = cache_packet(self.loaded, adapter, document)
            try:
                save_packet(path, packet, fingerprint, key)  # atomic: a refused file is replaced whole
            except OSError as exc:
                report.unstored.append(f"{path}: {exc.strerror or exc}")
            return packet

        def rebuild(path: Path, document: Sequence[int], damage: Damage) -> PacketCache:
            rebuilt.add(path)
            report.replaced.append(str(damage))
            return build(path, document)

        from_store = iter_packets(
            requests, fingerprint, dtype, device, adapter, threads=threads, host=host, repair=rebuild
        )
        again = {path for i, path in enumerate(paths) if first[path] != i}  # paths that recur, from `first`
        made: dict[Path, PacketCache] = {}  # a document twice in one query is built (or read) once
        try:
            for i, document in enumerate(documents):
                packet = found.get(i) or made.get(paths[i])
                if packet is None:
                    if i in held:
                        packet = packet_on_device(held[i], device, dtype)
                    elif i in stored:
                        with torch.profiler.record_function("kvpack.load_packet"):  # named when profiled, else free
                            packet = next(from_store)
                        if paths[i] in rebuilt:
                            report.built.append(i)
                    else:  # not in the store: cached now, and stored for the next query
                        packet = build(paths[i], document)
                        report.built.append(i)
                    if paths[i] in again:  # kept for its next place only: a streamed packet is let go once composed
                        made[paths[i]] = packet
                    self.resident.put(paths[i], packet)
                yield packet
        finally:
            from_store.close()

    def compose(self, engine: Engine, prompt: PacketPrompt, method: str = "packet") -> PacketComposition:
        """A fresh cache for preamble + documents, for `engine.prefill(prompt.tail, composed=...)`."""
        if not prompt.documents:
            raise InvalidInputError("packet composition needs at least one document")
        adapter = self.adapter_for(method)
        soft = sum(wrapped_length(d, adapter) - len(d) for d in prompt.documents)
        positions = len(prompt.preamble) + sum(len(d) for d in prompt.documents) + soft
        check_sliding_window(
            self.loaded, positions, "this packet composition (preamble, documents, soft tokens)", PACKET_REMEDY
        )
        preamble = _preamble_cache(engine, prompt.preamble)
        report = LoadReport()
        packets = self.stream(prompt.documents, method, report)  # each composed as it arrives
        lengths = [wrapped_length(d, adapter) for d in prompt.documents]
        try:
            with torch.profiler.record_function("kvpack.compose_packets"):
                move = method != "naive"
                cache = compose_packets(self.loaded, preamble, packets, self.spec, move=move, lengths=lengths)
        finally:
            packets.close()  # a refused packet: the reads still queued are cancelled now, not at collection
        recomputed, selection = 0, 0
        if method in ("blend", "epic"):
            recomputed, selection = self._recompute(cache, prompt, method)
        notes = [self._note(method, prompt, recomputed, len(report.built)), *report.notes()]
        composed = ComposedCache(cache, cache.get_seq_length(), method, exact=False, notes=notes, soft_tokens=soft)
        return PacketComposition(composed, recomputed, selection, len(report.built))

    def _recompute(self, cache: DynamicCache, prompt: PacketPrompt, method: str) -> tuple[int, int]:
        ids = [*prompt.preamble, *(t for d in prompt.documents for t in d)]
        starts, at = [], len(prompt.preamble)
        for d in prompt.documents:
            starts.append(at)
            at += len(d)
        if method == "epic":
            chosen = [s + i for s, d in zip(starts, prompt.documents) for i in range(min(self.epic_tokens, len(d)))]
            recompute_positions(self.loaded, cache, ids, chosen)
            return len(chosen), 0
        deviation = value_deviation(self.loaded, cache, ids)
        doc_positions = torch.arange(len(prompt.preamble), len(ids), device=deviation.device)
        k = max(1, round(self.blend_ratio * len(doc_positions)))
        chosen = doc_positions[deviation[doc_positions].topk(k).indices].tolist()
        recompute_positions(self.loaded, cache, ids, chosen)
        return len(chosen), len(ids)

    def _note(self, method: str, prompt: PacketPrompt, recomputed: int, built: int) -> str:
        n, tokens = len(prompt.documents), sum(len(d) for d in prompt.documents)
        how = {
            "packet": f"wrapped in packet adapter {adapter_id(self.adapter)}, keys re-rotated, nothing recomputed",
            "rerotated": "keys re-rotated, no adapter, nothing recomputed",
            "blend": f"keys re-rotated, {recomputed} of {tokens} document tokens recomputed (CacheBlend-style)",
            "epic": f"keys re-rotated, the first {self.epic_tokens} tokens of each recomputed (EPIC-style)",
            "naive": "concatenated without re-rotation",
        }[method]
        stored = f"; {built} of them cached now and stored in {self.store}" if built else ""
        return f"approximate: {n} documents composed from independently cached packets ({how}){stored}"


def _preamble_cache(engine: Engine, preamble: Sequence[int]) -> DynamicCache:
    """The preamble's K/V from the engine's exact prefix tree, prefilled once (and remembered) on a miss."""
    ids = list(preamble)
    with engine.lock:  # the tree is the engine's, shared with every other caller of the model
        composed = engine.compose([*ids, 0])
        cache, cached = composed.cache, composed.cached_tokens
        if cached < len(ids):
            forward(engine.loaded, cache, ids[cached:])
            for segment in segments_from_cache(engine.loaded, cache, ids, [len(ids)], start=cached):
                engine.tree.insert(ids[:cached], segment)
    return cache
