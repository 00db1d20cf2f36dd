"""Segments on disk: safetensors with string metadata, written atomically, verified on load."""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..errors import CorruptSegmentError, FingerprintMismatchError
from ..runtime.file_modes import file_mode
from ..runtime.fingerprint import NOT_RECORDED, Fingerprint
from .segment import KVSegment, SegmentKind

FORMAT = "kvpack-segment/1"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 over names and raw bytes (zero-copy): catches damaged files at ~GB/s.

    It guards against accidents, not tampering; identity is the fingerprint plus the content id.
    """
    crc = 0
    for name in sorted(tensors):
        t = tensors[name]
        crc = zlib.crc32(name.encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.contiguous().view(torch.uint8).numpy().data, crc)
    return f"crc32:{crc:08x}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):  # mkstemp's 0600 would hide the file from every other user
                os.fchmod(fh.fileno(), file_mode())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_segment(segment: KVSegment, path: Path, storage_dtype: torch.dtype | None = None) -> Path:
    """Save `segment` (optionally cast to a lower storage precision) atomically to `path`."""
    seg = segment.cast(storage_dtype) if storage_dtype is not None else segment
    tensors: dict[str, torch.Tensor] = {"token_ids": torch.tensor(seg.token_ids, dtype=torch.int64)}
    for i, (k, v) in enumerate(zip(seg.keys, seg.values)):
        tensors[f"k.{i}"] = k.detach().to("cpu").contiguous().clone()
        tensors[f"v.{i}"] = v.detach().to("cpu").contiguous().clone()
    metadata = {
        "format": FORMAT,
        "id": seg.id,
        "kind": seg.kind.value,
        "start": str(seg.start),
        "context": seg.context,
        "fingerprint": seg.fingerprint.to_json(),
        "storage_dtype": seg.storage_dtype,
        "computed_on": seg.computed_on,
        "checksum": _checksum(tensors),
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CorruptSegmentError(f"segment file is missing: {path}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptSegmentError(f"segment file {path} is unreadable or truncated: {exc}") from exc
    return tensors, metadata


def load_segment(path: Path, expected: Fingerprint | None = None, device: str | torch.device = "cpu") -> KVSegment:
    """Load and verify a segment: format, fingerprint (if `expected`), checksum, shapes, id."""
    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("format") != FORMAT:
        raise CorruptSegmentError(f"{path} is not a kvpack segment (format {meta.get('format')!r})")
    try:
        fingerprint = Fingerprint.from_json(meta["fingerprint"])
        start, kind = int(meta["start"]), SegmentKind(meta["kind"])
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        raise CorruptSegmentError(f"{path} has malformed metadata: {exc}") from exc
    if expected is not None and fingerprint != expected:
        raise FingerprintMismatchError(
            f"segment {path.name} was built for another model: " + "; ".join(expected.mismatches(fingerprint))
        )
    if _checksum(tensors) != meta.get("checksum"):
        raise CorruptSegmentError(f"{path} fails its checksum (the file was modified or damaged)")
    layers = fingerprint.num_layers
    try:
        keys = [tensors[f"k.{i}"].to(device) for i in range(layers)]
        values = [tensors[f"v.{i}"].to(device) for i in range(layers)]
        token_ids = tuple(tensors["token_ids"].tolist())
    except KeyError as exc:
        raise CorruptSegmentError(f"{path} lacks tensor {exc}") from None
    segment = KVSegment(
        token_ids=token_ids,
        keys=keys,
        values=values,
        start=start,
        fingerprint=fingerprint,
        kind=kind,
        context=meta.get("context", ""),
        computed_on=meta.get("computed_on", NOT_RECORDED),
    )
    if segment.id != meta.get("id"):
        raise CorruptSegmentError(f"{path}: content does not match its recorded id")
    return segment
