"""KV Packet: documents cached on their own, wrapped in trained soft tokens, composed without recompute."""

from .adapter import PacketAdapter

__all__ = ["PacketAdapter"]
