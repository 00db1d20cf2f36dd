"""Packet caches on disk: one fingerprinted safetensors file per (document, adapter).

A packet is reusable at any position and next to any other document, so it is named by content: the
model it was computed by, the adapter it was wrapped with (`plain` for none) and the document's token
ids.
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
from .compose import PacketCache, wrapped_length

FORMAT = "kvpack-packet/1"


def adapter_id(adapter: PacketAdapter | None) -> str:
    """`plain`, or a short digest of the soft tokens (a retrained adapter gets new packets)."""
    if adapter is None:
        return "plain"
    digest = hashlib.sha256(adapter.header.float().numpy().tobytes() + adapter.trailer.float().numpy().tobytes())
    return digest.hexdigest()[:12]


def packet_path(
    root: str | Path, document: Sequence[int], adapter: PacketAdapter | None, fingerprint: Fingerprint
) -> Path:
    """`root/<model>/<adapter>/<document>.safetensors`: models that share a tokenizer (a base model and its
    fine-tune, one model in two dtypes) get the same document ids but other caches, so each model has
    its own folder in a shared store."""
    doc = hashlib.sha256(",".join(map(str, document)).encode()).hexdigest()[:20]
    return Path(root).expanduser() / fingerprint.digest / adapter_id(adapter) / f"{doc}.safetensors"


def save_packet(path: Path, packet: PacketCache, fingerprint: Fingerprint) -> Path:
    """Keys and values in the cache's own dtype (the fingerprint fixes it), so loading converts nothing."""
    tensors = {
        "keys": torch.stack(packet.keys),
        "values": torch.stack(packet.values),
        "document": torch.tensor(packet.document, dtype=torch.long),
    }
    return save_tensor_file(path, tensors, file_format=FORMAT, fingerprint=fingerprint, keep_dtype=True)


def load_packet(
    path: Path,
    expected: Fingerprint,
    dtype: torch.dtype,
    device: torch.device | str,
    document: Sequence[int],
    adapter: PacketAdapter | None,
) -> PacketCache:
    """The packet of `document` wrapped in `adapter`, checked to be exactly that: a file of another
    document, cut short, or of other shapes is refused by name rather than composed."""
    tensors, _, _ = load_tensor_file(path, file_format=FORMAT, what="packet", expected=expected)
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
    keys, values = keys.to(device, dtype), values.to(device, dtype)
    return PacketCache(tuple(document), tuple(keys.unbind(0)), tuple(values.unbind(0)))
