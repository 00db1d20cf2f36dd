"""Packet caches on disk: one fingerprinted safetensors file per (document, adapter).

A packet is reusable at any position and next to any other document, so it is named by content: the
model it was computed by, the adapter it was wrapped with (`plain` for none) and the document's token
ids.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import CorruptSegmentError, FingerprintMismatchError, InvalidInputError
from ..runtime.fingerprint import Fingerprint
from ..segments.tensor_files import save_tensor_file
from ..segments.whole_tensor_file import read_tensor_file_whole
from .adapter import PacketAdapter
from .compose import PacketCache, wrapped_length
from .resident import ResidentPackets

FORMAT = "kvpack-packet/1"
ADAPTER_KEY = "adapter"  # the metadata entry naming the adapter a packet was wrapped in (`adapter_id`)
LOAD_THREADS = 16  # files read at once onto a GPU (measured on an H200 host: 16 beat 8 by 13-23%)
# what a stored packet file can be refused for: unreadable or cut short (InvalidInputError, as for any
# tensor file), another model's, another document's or adapter's, other shapes
Damage = CorruptSegmentError | FingerprintMismatchError | InvalidInputError
Repair = Callable[[Path, Sequence[int], Damage], PacketCache]  # (path, document, why) -> a packet on the device


def adapter_id(adapter: PacketAdapter | None) -> str:
    """`plain`, or a short digest of the soft tokens (a retrained adapter gets new packets)."""
    return "plain" if adapter is None else adapter.digest()


def packet_path(
    root: str | Path, document: Sequence[int], adapter: PacketAdapter | str | None, fingerprint: Fingerprint
) -> Path:
    """`root/<model>/<adapter>/<document>.safetensors`: models that share a tokenizer (a base model and its
    fine-tune, one model in two dtypes) get the same document ids but other caches, so each model has
    its own folder in a shared store. `adapter` may be its `adapter_id`, computed once for many paths."""
    doc = hashlib.sha256(",".join(map(str, document)).encode()).hexdigest()[:20]
    folder = adapter if isinstance(adapter, str) else adapter_id(adapter)
    return Path(root).expanduser() / fingerprint.digest / folder / f"{doc}.safetensors"


def save_packet(
    path: Path, packet: PacketCache, fingerprint: Fingerprint, adapter: PacketAdapter | str | None = None
) -> Path:
    """Keys and values in the cache's own dtype (the fingerprint fixes it), so loading converts nothing.
    The file records the adapter it was wrapped in (`adapter_id`; None: plain), so a packet copied or
    moved into another adapter's folder is refused when read, not composed with the wrong soft tokens."""
    tensors = {
        "keys": packet.keys,
        "values": packet.values,
        "document": torch.tensor(packet.document, dtype=torch.long),
    }
    recorded = adapter if isinstance(adapter, str) else adapter_id(adapter)
    # the length tells a wrapped packet from a plain one: a caller that forgot the adapter (None: plain)
    # is refused here, rather than writing a file that names the wrong adapter
    if isinstance(adapter, str):  # an id alone: only plain or wrapped can be told
        fits = (packet.length == len(packet.document)) == (adapter == "plain")
    else:
        fits = packet.length == wrapped_length(packet.document, adapter)
    if not fits:
        raise InvalidInputError(
            f"a packet of {packet.length} positions for a document of {len(packet.document)} tokens cannot be "
            f"stored as wrapped in adapter {recorded}: pass the adapter it was cached with"
        )
    meta = {ADAPTER_KEY: recorded}
    return save_tensor_file(path, tensors, file_format=FORMAT, fingerprint=fingerprint, metadata=meta, keep_dtype=True)


def default_load_threads(device: torch.device) -> int:
    """Files read at once: on a GPU, reads overlap the copies of files read before them; on a CPU the
    read is the whole load, and threads only contend (measured: `benchmarks/packet_load_cpu.py`)."""
    return min(LOAD_THREADS, os.cpu_count() or 1) if device.type == "cuda" else 1


def load_packets(
    requests: Sequence[tuple[Path, Sequence[int]]],
    expected: Fingerprint,
    dtype: torch.dtype,
    device: torch.device | str,
    adapter: PacketAdapter | None,
    *,
    threads: int | None = None,
    host: ResidentPackets | None = None,
) -> list[PacketCache]:
    """The packets of (path, document) pairs, each checked to be exactly that document's, on `device`."""
    return list(iter_packets(requests, expected, dtype, device, adapter, threads=threads, host=host))


def iter_packets(
    requests: Sequence[tuple[Path, Sequence[int]]],
    expected: Fingerprint,
    dtype: torch.dtype,
    device: torch.device | str,
    adapter: PacketAdapter | None,
    *,
    threads: int | None = None,
    host: ResidentPackets | None = None,
    repair: Repair | None = None,
) -> Generator[PacketCache, None, None]:
    """`load_packets` as a stream, in request order, each packet as soon as its file is read.

    Each file is read whole; for a GPU into page-locked memory, `threads` files at once, and copied
    asynchronously (the copies queue on the current stream, before any use of the packets). A file of
    another document, cut short, or of other shapes is refused by name. `host`: where each packet read
    is kept, checked, in host memory (page-locked for a GPU) for later queries; the caller takes what it
    already holds before asking for files (`PacketComposer.stream`). `repair`: what to do with a file that
    is refused (called in the consumer's thread, where the model may run); without it the refusal is raised."""
    device = torch.device(device)
    pin = device.type == "cuda"
    threads = default_load_threads(device) if threads is None else threads
    if threads < 1:
        raise InvalidInputError(f"packet load threads must be >= 1, got {threads}")
    wanted = adapter_id(adapter)  # once: hashing the soft tokens per file would cost ms each on a large model

    def fetch(path: Path, document: Sequence[int]) -> PacketCache | Damage:
        """The packet in host memory: read whole from its file and checked (and kept in `host`); or, when
        there is a `repair`, why the file was refused."""
        try:
            tensors, meta, _ = read_tensor_file_whole(
                path, file_format=FORMAT, what="packet", expected=expected, pin=pin
            )
            packet = _checked(path, tensors, meta, expected, document, adapter, wanted)
        except (CorruptSegmentError, FingerprintMismatchError, InvalidInputError) as damage:
            if repair is None:
                raise
            return damage
        if host is not None:
            host.put(path, packet)
        return packet

    def deliver(fetched: PacketCache | Damage, path: Path, document: Sequence[int]) -> PacketCache:
        if isinstance(fetched, PacketCache):
            return packet_on_device(fetched, device, dtype)
        assert repair is not None  # fetch returns a refusal only when there is a repair
        return repair(path, document, fetched)

    if threads == 1 or len(requests) < 2:
        for path, document in requests:
            yield deliver(fetch(path, document), path, document)
        return
    with ThreadPoolExecutor(min(threads, len(requests))) as pool:
        pending: deque[Future[PacketCache | Damage]] = deque()
        queued = iter(requests)
        try:
            for path, document in requests:
                # at most 2 x threads files read ahead: a query's packets never all sit in (page-locked)
                # host memory at once, and each buffer not kept in `host` is let go once handed over
                while len(pending) < 2 * threads and (nxt := next(queued, None)) is not None:
                    pending.append(pool.submit(fetch, *nxt))
                yield deliver(pending.popleft().result(), path, document)
        finally:
            for future in pending:
                future.cancel()  # a refused file, or a consumer that stops early, stops the reads not yet started


def load_packet(
    path: Path,
    expected: Fingerprint,
    dtype: torch.dtype,
    device: torch.device | str,
    document: Sequence[int],
    adapter: PacketAdapter | None,
) -> PacketCache:
    """The packet of `document` wrapped in `adapter`, checked (`load_packets` of one file)."""
    return load_packets([(path, document)], expected, dtype, device, adapter)[0]


def _checked(
    path: Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    expected: Fingerprint,
    document: Sequence[int],
    adapter: PacketAdapter | None,
    wanted: str,
) -> PacketCache:
    """The file's packet, still where it was read, once it is shown to be `document`'s, whole, wrapped in
    `adapter` (whose `adapter_id` is `wanted`)."""
    keys, values, stored = tensors.get("keys"), tensors.get("values"), tensors.get("document")
    if keys is None or values is None or stored is None:
        raise CorruptSegmentError(f"{path}: keys, values or document ids missing")
    shape = (expected.num_layers, expected.num_kv_heads, wrapped_length(document, adapter), expected.head_dim)
    if tuple(keys.shape) != shape or tuple(values.shape) != shape:
        raise CorruptSegmentError(
            f"{path}: keys {tuple(keys.shape)} / values {tuple(values.shape)}, expected {shape} "
            "(layers, KV heads, header + document + trailer, head dim)"
        )
    if tuple(int(x) for x in stored.reshape(-1).tolist()) != tuple(document):
        raise CorruptSegmentError(f"{path}: holds the packet of another document")
    # Files written before the adapter was recorded carry no entry: they are accepted as before, since
    # `packet_path` put each in its adapter's folder (only a file moved by hand could be misplaced), and
    # refusing them would make every existing store unusable until rebuilt.
    # (checked after the shapes: a plain packet read as a wrapped one is named by its length first)
    recorded = meta.get(ADAPTER_KEY)
    if recorded is not None and recorded != wanted:
        raise CorruptSegmentError(f"{path}: holds a packet wrapped in adapter {recorded}, not {wanted}")
    return PacketCache(tuple(document), keys, values)


def packet_on_device(packet: PacketCache, device: torch.device, dtype: torch.dtype) -> PacketCache:
    """The packet on `device`; from page-locked memory the copy is asynchronous and carries an event."""
    if not packet.keys.is_pinned():
        return PacketCache(packet.document, packet.keys.to(device, dtype), packet.values.to(device, dtype))
    keys = packet.keys.to(device, dtype, non_blocking=True)
    values = packet.values.to(device, dtype, non_blocking=True)
    ready = torch.cuda.Event()  # the copies' end, for a use on another stream (`PacketCache.wait_ready`)
    ready.record()
    return PacketCache(packet.document, keys, values, ready)
