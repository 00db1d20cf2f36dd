"""Packet caches on disk: one fingerprinted safetensors file per (document, adapter).

A packet is reusable at any position and next to any other document, so it is named by content: the
document's token ids and the adapter it was wrapped with (`plain` for none).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import CorruptSegmentError
from ..runtime.fingerprint import Fingerprint
from ..segments.tensor_files import load_tensor_file, save_tensor_file
from .adapter import PacketAdapter
from .compose import PacketCache

FORMAT = "kvpack-packet/1"


def adapter_id(adapter: PacketAdapter | None) -> str:
    """`plain`, or a short digest of the soft tokens (a retrained adapter gets new packets)."""
    if adapter is None:
        return "plain"
    digest = hashlib.sha256(adapter.header.float().numpy().tobytes() + adapter.trailer.float().numpy().tobytes())
    return digest.hexdigest()[:12]


def packet_path(root: str | Path, document: Sequence[int], adapter: PacketAdapter | None) -> Path:
    doc = hashlib.sha256(",".join(map(str, document)).encode()).hexdigest()[:20]
    return Path(root).expanduser() / adapter_id(adapter) / f"{doc}.safetensors"


def save_packet(path: Path, packet: PacketCache, fingerprint: Fingerprint) -> Path:
    """Keys and values in the cache's own dtype (the fingerprint fixes it), so loading converts nothing."""
    tensors = {
        "keys": torch.stack(packet.keys),
        "values": torch.stack(packet.values),
        "document": torch.tensor(packet.document, dtype=torch.long),
    }
    return save_tensor_file(path, tensors, file_format=FORMAT, fingerprint=fingerprint, keep_dtype=True)


def load_packet(path: Path, expected: Fingerprint, dtype: torch.dtype, device: torch.device | str) -> PacketCache:
    tensors, _, _ = load_tensor_file(path, file_format=FORMAT, what="packet", expected=expected)
    keys, values = tensors.get("keys"), tensors.get("values")
    if keys is None or values is None or keys.shape != values.shape or keys.shape[0] != expected.num_layers:
        raise CorruptSegmentError(f"{path}: keys/values missing or of the wrong shape for this model")
    document = tuple(int(x) for x in tensors["document"].tolist())
    keys, values = keys.to(device, dtype), values.to(device, dtype)
    return PacketCache(document, tuple(keys.unbind(0)), tuple(values.unbind(0)))
