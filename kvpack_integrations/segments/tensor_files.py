"""Small fingerprinted safetensors files (steering vectors, packet adapters): one format check, one
fingerprint check, atomic writes. Segments have their own, richer serialization."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import FingerprintMismatchError, InvalidInputError
from ..runtime.fingerprint import Fingerprint
from .serialization import atomic_write_bytes


def save_tensor_file(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    file_format: str,
    fingerprint: Fingerprint,
    metadata: Mapping[str, str] | None = None,
    keep_dtype: bool = False,
) -> Path:
    """Write `tensors` with the format tag, the fingerprint and `metadata`; readers never see half a file.

    Tensors are stored as float32 unless `keep_dtype` (K/V caches: bfloat16 stays half the bytes)."""
    from safetensors.torch import save

    path = Path(path).expanduser()
    meta = {**(metadata or {}), "format": file_format, "fingerprint": fingerprint.to_json()}
    stored = {k: (v.detach() if keep_dtype else v.detach().float()).contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(stored, metadata=meta))
    return path


def load_tensor_file(
    path: str | Path, *, file_format: str, what: str, expected: Fingerprint | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str], Fingerprint]:
    """Read a file written by `save_tensor_file`: (tensors, metadata, fingerprint); `what` names it in errors."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise InvalidInputError(f"{path} is not a readable {what} ({exc})") from None
    return tensors, meta, check_tensor_metadata(path, meta, file_format=file_format, what=what, expected=expected)


def check_tensor_metadata(
    path: Path, meta: Mapping[str, str], *, file_format: str, what: str, expected: Fingerprint | None
) -> Fingerprint:
    """The file's fingerprint, once its format tag says it is a kvpack `what` (of the `expected` model)."""
    if meta.get("format") != file_format:
        raise InvalidInputError(f"{path} is not a kvpack {what} (format {meta.get('format')!r})")
    try:
        fingerprint = Fingerprint.from_json(meta["fingerprint"])
    except (KeyError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"{path}: unreadable model fingerprint ({exc})") from None
    if expected is not None and fingerprint != expected:
        raise FingerprintMismatchError(
            f"{what} {path.name} was built for another model: " + "; ".join(expected.mismatches(fingerprint))
        )
    return fingerprint
