"""Caching a document as a packet and composing packets into one cache without recomputing them.

`cache_packet` runs `header + document + trailer` alone at positions 0..m-1 (the soft tokens enter as
input embeddings). `compose_packets` lays a preamble cache and the packets end to end, each packet's
keys re-rotated to its offset with the model's own RoPE; values are copied as they are. Nothing of a
document is recomputed, so the result is approximate: the usage report says so.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

import torch
from transformers import DynamicCache

from ..composition.cache_ops import check_sliding_window, empty_cache
from ..composition.rope import RopeSpec, rerotate_layers
from ..errors import CompositionError
from ..runtime.cache_keyword import with_cache
from ..runtime.loader import LoadedModel
from .adapter import PacketAdapter

PACKET = "this packet (header, document and trailer)"
PACKET_REMEDY = "keep documents shorter or use exact composition"


@dataclass(frozen=True)
class PacketCache:
    """One wrapped document's K/V at positions 0..m-1 (m = header + document + trailer tokens)."""

    document: tuple[int, ...]
    keys: torch.Tensor  # [layers, kv_heads, m, head_dim], one block: composing it is one copy per packet
    values: torch.Tensor
    ready: Any = field(default=None, compare=False, repr=False)  # a CUDA event: its copy to the device ended

    @property
    def length(self) -> int:
        return int(self.keys.shape[-2])

    def wait_ready(self) -> None:
        """Make the current stream wait for the packet's asynchronous copy (a packet loaded on one stream,
        or resident, may be composed on another); no host synchronisation."""
        if self.ready is not None:
            torch.cuda.current_stream(self.keys.device).wait_event(self.ready)


def wrapped_embeddings(loaded: LoadedModel, adapter: PacketAdapter, document: Sequence[int]) -> torch.Tensor:
    """[1, m, hidden]: the header, the document's token embeddings, the trailer."""
    table = loaded.model.get_input_embeddings()
    ids = torch.tensor([list(document)], dtype=torch.long, device=loaded.device)
    embedded = table(ids)[0]
    soft = [
        adapter.header.to(embedded.device, embedded.dtype),
        embedded,
        adapter.trailer.to(embedded.device, embedded.dtype),
    ]
    return torch.cat(soft, dim=0)[None]


def wrapped_length(document: Sequence[int], adapter: PacketAdapter | None) -> int:
    """Positions a document's packet holds: its tokens plus the adapter's soft tokens."""
    soft = 0 if adapter is None else adapter.header_tokens + adapter.trailer_tokens
    return len(document) + soft


def cache_packet(loaded: LoadedModel, adapter: PacketAdapter | None, document: Sequence[int]) -> PacketCache:
    """The document alone at positions 0..m-1, wrapped in the adapter's soft tokens (plain with None)."""
    if not document:
        raise CompositionError("a packet needs at least one document token")
    check_sliding_window(loaded, wrapped_length(document, adapter), PACKET, PACKET_REMEDY)
    cache = empty_cache(loaded)
    with torch.no_grad():
        if adapter is None:
            ids = torch.tensor([list(document)], dtype=torch.long, device=loaded.device)
            loaded.model(input_ids=ids, **with_cache(loaded.model, cache), use_cache=True)
        else:
            adapter.check_model(loaded)
            embeds = wrapped_embeddings(loaded, adapter, document)
            loaded.model(inputs_embeds=embeds, **with_cache(loaded.model, cache), use_cache=True)
    keys, values = [], []
    for layer in cache.layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or v is None:
            raise CompositionError(f"{type(layer).__name__} cache layers keep no keys/values: no packets")
        keys.append(k[0].detach())
        values.append(v[0].detach())
    return PacketCache(tuple(document), torch.stack(keys), torch.stack(values))


def compose_packets(
    loaded: LoadedModel,
    preamble: DynamicCache,
    packets: Iterable[PacketCache],
    spec: RopeSpec,
    *,
    move: bool = True,
    lengths: Sequence[int] | None = None,
) -> DynamicCache:
    """A fresh cache: the preamble's K/V, then every packet moved to its offset (keys re-rotated).

    Each packet is re-rotated once for all layers (the rotation depends only on its offset), straight
    into one preallocated [layers, kv_heads, positions, head_dim] buffer per keys and values.
    `lengths` (each packet's positions, known from the documents) lets `packets` be a stream: each one
    is composed as it arrives, so the device composes one packet while the next is still being read.
    `move=False` leaves each packet's keys at positions 0..m-1 (naive concatenation, an ablation)."""
    if lengths is None:
        packets = list(packets)
        lengths = [p.length for p in packets]
    if not lengths:
        raise CompositionError("no packets to compose")
    head = preamble.get_seq_length()
    fp = loaded.fingerprint
    if head and len(preamble.layers) != fp.num_layers:
        raise CompositionError(f"a preamble cache of {len(preamble.layers)} layers for {fp.num_layers}")
    shape = (fp.num_layers, fp.num_kv_heads, head + sum(lengths), fp.head_dim)
    keys = torch.empty(shape, dtype=loaded.dtype, device=loaded.device)
    values = torch.empty_like(keys)
    for i, layer in enumerate(preamble.layers if head else ()):
        old_keys, old_values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if old_keys is None or old_values is None:
            raise CompositionError(f"{type(layer).__name__} cache layers keep no keys/values: no packets")
        keys[i, :, :head] = old_keys[0]
        values[i, :, :head] = old_values[0]
    start, count = head, 0
    for packet, length in zip_longest(packets, lengths):
        want = (*shape[:2], length, shape[-1])
        if packet is None or length is None or packet.keys.shape != want or packet.values.shape != want:
            got = "no packet" if packet is None else f"a packet of shape {tuple(packet.keys.shape)}"
            if packet is not None and packet.keys.shape == want:
                got = f"values of shape {tuple(packet.values.shape)}"
            raise CompositionError(f"packet {count}: {got}, expected {length} positions of this model's K/V")
        packet.wait_ready()
        end = start + length
        if move:
            rerotate_layers(packet.keys, start, spec, out=keys[:, :, start:end])
        else:
            keys[:, :, start:end] = packet.keys
        values[:, :, start:end] = packet.values
        start, count = end, count + 1
    cache = empty_cache(loaded)
    for i in range(fp.num_layers):
        cache.update(keys[i][None], values[i][None], i)
    return cache
