"""Packets kept between queries: a least-recently-used set bounded in bytes, on the model's device
(`PacketComposer.resident`) or in host memory as read from the store (`PacketComposer.host`).

Why: on a GPU, reading a document's packet from the store and copying it to the device can take longer
than the prefill it saves (an 8B model's K/V is 128 KiB per token in bfloat16). Agent loops and chat
sessions compose the same documents again and again; keeping their packets resident makes a repeat
cost only the re-rotation. Where the device cannot hold them all, a host tier of page-locked buffers
makes a repeat cost only the copy to the device (no file read). Packets are named by content (document
tokens and adapter) and never modified by composition (it copies them), so a kept packet stays valid
as long as it is kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import InvalidInputError
from .compose import PacketCache


def packet_bytes(packet: PacketCache) -> int:
    """Bytes the packet's keys and values hold: their storages, counted once each (a packet read on a
    CPU is a view of its whole file's buffer, document ids and header included). A page-locked buffer
    counts as torch's caching host allocator holds it: rounded up to a power of two."""
    storages = {}
    for tensor in (packet.keys, packet.values):
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        if tensor.is_pinned() and size > 1:
            size = 1 << (size - 1).bit_length()
        storages[storage.data_ptr()] = size
    return sum(storages.values())


class ResidentPackets:
    """Up to `budget_bytes` of packets, the least recently used dropped first (0: keeps none).

    Thread-safe: one composer may serve several engines on the same model."""

    def __init__(self, budget_bytes: int = 0, where: str = "resident") -> None:
        if budget_bytes < 0:
            raise InvalidInputError(f"the {where} packet budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self._packets: OrderedDict[Path, tuple[PacketCache, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._packets)

    def __contains__(self, path: object) -> bool:
        """Whether `path`'s packet is kept (not counted as a hit or a miss: `get` takes it)."""
        with self._lock:
            return path in self._packets

    def get(self, path: Path) -> PacketCache | None:
        with self._lock:
            entry = self._packets.get(path)
            if entry is None:
                self.misses += 1
                return None
            self._packets.move_to_end(path)
            self.hits += 1
            return entry[0]

    def put(self, path: Path, packet: PacketCache) -> None:
        """Keep `packet` (a packet larger than the whole budget is not kept)."""
        size = packet_bytes(packet)
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._packets.pop(path, None)
            if old is not None:
                self.used_bytes -= old[1]
            while self._packets and self.used_bytes + size > self.budget_bytes:
                _, (_, dropped) = self._packets.popitem(last=False)
                self.used_bytes -= dropped
            self._packets[path] = (packet, size)
            self.used_bytes += size

    def clear(self) -> None:
        with self._lock:
            self._packets.clear()
            self.used_bytes = 0
