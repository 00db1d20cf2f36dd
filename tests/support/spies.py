"""Spies the tests share: what the code under test read."""

from __future__ import annotations

from typing import Any


def packet_file_reads(monkeypatch: Any) -> list[str]:
    """The names of the packet files the store reads from now on (the list grows as they are read)."""
    from kvpack_integrations.packet import store as packet_store

    reads: list[str] = []
    real = packet_store.read_tensor_file_whole

    def counted(path: Any, **kwargs: Any) -> Any:
        reads.append(path.name)
        return real(path, **kwargs)

    monkeypatch.setattr(packet_store, "read_tensor_file_whole", counted)
    return reads
