"""`KVSegment`: the unit of reusable cache.

A segment holds the keys and values of a run of tokens at absolute positions [start, start+len),
computed with a specific context in front (`context` is the hash of those tokens; empty for a
segment computed on its own at position 0). It is valid only after exactly that context, on exactly
the model in its fingerprint. `computed_on` says under which numerics (device, attention kernel) its K/V
were computed: elsewhere they differ by rounding, so they are reused but no longer called exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..errors import CorruptSegmentError
from ..runtime.device import dtype_name
from ..runtime.fingerprint import NOT_RECORDED, Fingerprint


class SegmentKind(str, Enum):
    """How a segment was made, which decides how it may be composed."""

    EXACT_PREFIX = "exact-prefix"
    PACKET = "packet"
    STEERING_DELTA = "steering-delta"


# storage dtypes that hold every value of a compute dtype exactly (a wider float with as many exponent bits)
_HOLDS = {
    ("float32", "bfloat16"),
    ("float32", "float16"),
    ("float64", "float32"),
    ("float64", "bfloat16"),
    ("float64", "float16"),
}


def holds_exactly(storage: str, compute: str) -> bool:
    """Whether K/V computed in `compute` survive storage in `storage` bit for bit (same dtype, or wider)."""
    return storage == compute or (storage, compute) in _HOLDS


def context_hash(context_ids: Sequence[int]) -> str:
    """Hash of the tokens in front of a segment: its K/V are valid only after exactly these tokens."""
    return hashlib.blake2b(",".join(map(str, context_ids)).encode(), digest_size=12).hexdigest()


def segment_id(fingerprint: Fingerprint, context: str, start: int, kind: str, token_ids: tuple[int, ...]) -> str:
    """Content address of a segment: same model, context, position and tokens -> same id."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{fingerprint.digest}|{context}|{start}|{kind}|".encode())
    h.update(",".join(map(str, token_ids)).encode())
    return h.hexdigest()


@dataclass
class KVSegment:
    """Token ids + per-layer K/V tensors shaped [kv_heads, tokens, head_dim]."""

    token_ids: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    start: int
    fingerprint: Fingerprint
    kind: SegmentKind = SegmentKind.EXACT_PREFIX
    context: str = ""
    computed_on: str = NOT_RECORDED  # `LoadedModel.numerics` where it was computed (not part of the id)
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = tuple(int(t) for t in self.token_ids)
        fp = self.fingerprint
        if len(self.keys) != fp.num_layers or len(self.values) != fp.num_layers:
            raise CorruptSegmentError(
                f"segment has {len(self.keys)} key / {len(self.values)} value layers, model has {fp.num_layers}"
            )
        expected = (fp.num_kv_heads, len(self.token_ids), fp.head_dim)
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if tuple(k.shape) != expected or tuple(v.shape) != expected:
                raise CorruptSegmentError(
                    f"layer {i}: K {tuple(k.shape)} / V {tuple(v.shape)} do not match {expected} "
                    "(kv_heads, tokens, head_dim)"
                )
        self.id = segment_id(fp, self.context, self.start, self.kind.value, self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def storage_dtype(self) -> str:
        return dtype_name(self.keys[0].dtype) if self.keys else self.fingerprint.dtype

    @property
    def lossless(self) -> bool:
        """False when stored in a precision that cannot hold the model's values (then no longer exact)."""
        return holds_exactly(self.storage_dtype, self.fingerprint.dtype)

    def exact_under(self, numerics: str) -> bool:
        """Whether these K/V are what a model computing under `numerics` would compute now: stored at full
        precision and computed under the same numerics (a segment from before the stamp is taken as such)."""
        return self.lossless and self.computed_on in (numerics, NOT_RECORDED)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def part(self, lo: int, hi: int, context: str) -> KVSegment:
        """Tokens [lo, hi) as a segment of their own, its tensors copied (not views that would keep the
        whole segment's memory alive); `context` is the hash of everything in front of token `lo`."""
        return KVSegment(
            token_ids=self.token_ids[lo:hi],
            keys=[k[:, lo:hi].clone() for k in self.keys],
            values=[v[:, lo:hi].clone() for v in self.values],
            start=self.start + lo,
            fingerprint=self.fingerprint,
            kind=self.kind,
            context=context,
            computed_on=self.computed_on,
        )

    def cast(self, dtype: torch.dtype) -> KVSegment:
        """A copy whose tensors are in `dtype` (fp16/bf16 storage, or back to compute dtype)."""
        return KVSegment(
            token_ids=self.token_ids,
            keys=[k.to(dtype) for k in self.keys],
            values=[v.to(dtype) for v in self.values],
            start=self.start,
            fingerprint=self.fingerprint,
            kind=self.kind,
            context=self.context,
            computed_on=self.computed_on,
        )
