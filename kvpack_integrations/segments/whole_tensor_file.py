"""A fingerprinted safetensors file read whole into one host buffer, pinned for a GPU if asked.

Why: a memory-mapped file reaches a GPU through pageable memory, one page fault at a time, at a few GB/s;
an 8B model's packets are 128 KiB per token. Read whole (one `readinto` per file, several files on
several threads) into page-locked memory, they copy to the GPU asynchronously at the bus's speed. The
tensors are views of the buffer: nothing is converted or copied on the host.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError
from ..runtime.fingerprint import Fingerprint
from .tensor_files import check_tensor_metadata

_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_HEADER_BYTES = 8  # little-endian length of the JSON header that follows
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
if sys.byteorder != "little":  # safetensors stores little-endian; views would read every value wrong
    raise ImportError("kvpack reads tensor files on little-endian machines only")


def read_whole(path: Path, *, pin: bool) -> torch.Tensor:
    """The file's bytes in one uint8 tensor (page-locked when `pin`: needs a GPU build of torch)."""
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size  # of the file opened, not of whatever the path names later
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        view = buffer.numpy().data
        got = 0
        while got < size:
            n = fh.readinto(view[got:])
            if not n:
                raise InvalidInputError(f"{path} was cut short while being read ({got} of {size} bytes)")
            got += n
    return buffer


def parse_safetensors(path: Path, buffer: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors as views of `buffer`, metadata), held to safetensors' own rules: integer shapes and
    offsets, tensors laid end to end from the start of the data to the end of the file, string
    metadata, a header under 100 MB."""
    size = buffer.numel()
    if size < _HEADER_BYTES:
        raise InvalidInputError(f"{path} is not a safetensors file ({size} bytes)")
    header_len = int.from_bytes(buffer[:_HEADER_BYTES].numpy().tobytes(), "little")
    base = _HEADER_BYTES + header_len
    if header_len > _MAX_HEADER_BYTES or base > size:
        raise InvalidInputError(f"{path}: its header claims {header_len} bytes, the file has {size}")
    try:
        header: Any = json.loads(buffer[_HEADER_BYTES:base].numpy().tobytes())
        if not isinstance(header, dict):
            raise TypeError("the header must be an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise TypeError("the metadata must be an object of strings")
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidInputError(f"{path}: unreadable safetensors header ({exc})") from None
    entries = sorted((_entry(path, name, info) for name, info in header.items()), key=lambda e: e[3])
    at = 0
    for name, _, _, start, end in entries:  # end to end, as safetensors writes and checks them
        if start != at:
            raise InvalidInputError(f"{path}: tensor {name!r} does not start where the one before it ends")
        at = end
    if at != size - base:
        raise InvalidInputError(f"{path}: its tensors end at byte {base + at}, the file at {size}")
    return {e[0]: _view(path, buffer, base, *e) for e in entries}, meta


def _entry(path: Path, name: str, info: Any) -> tuple[str, torch.dtype, list[int], int, int]:
    """(name, dtype, shape, start, end) of a header entry; integers only, the byte count the shape's."""

    def integers(values: Any, count: int | None = None) -> list[int]:
        if not isinstance(values, list) or (count is not None and len(values) != count):
            raise TypeError(f"expected a list of {count or 'some'} integers, got {values!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise TypeError(f"expected integers >= 0, got {values!r}")
        return list(values)

    try:
        if not isinstance(info, dict):
            raise TypeError("not an object")
        dtype = _DTYPES[info["dtype"]]
        shape = integers(info["shape"])
        start, end = integers(info["data_offsets"], 2)
    except (KeyError, TypeError) as exc:
        raise InvalidInputError(f"{path}: tensor {name!r} has an unreadable or unsupported entry ({exc})") from None
    if end < start:
        raise InvalidInputError(f"{path}: tensor {name!r} lies outside the file")
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - start != need:
        raise InvalidInputError(f"{path}: tensor {name!r} holds {end - start} bytes, its shape {shape} needs {need}")
    return name, dtype, shape, start, end


def _view(
    path: Path, buffer: torch.Tensor, base: int, name: str, dtype: torch.dtype, shape: list[int], start: int, end: int
) -> torch.Tensor:
    raw = buffer[base + start : base + end]
    if (base + start) % torch.empty((), dtype=dtype).element_size():  # views need aligned offsets; safetensors
        raw = raw.clone()  # writers align, others may not
    return raw.view(dtype).reshape(shape)


def read_tensor_file_whole(
    path: str | Path, *, file_format: str, what: str, expected: Fingerprint | None = None, pin: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str], Fingerprint]:
    """`load_tensor_file`, reading the file whole (into page-locked memory with `pin`): the same checks."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"{what} file not found: {path}")
    tensors, meta = parse_safetensors(path, read_whole(path, pin=pin))
    return tensors, meta, check_tensor_metadata(path, meta, file_format=file_format, what=what, expected=expected)
