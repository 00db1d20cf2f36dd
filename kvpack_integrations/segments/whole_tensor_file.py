"""A fingerprinted safetensors file read whole into one host buffer, pinned for a GPU if asked.

Why: a memory-mapped file reaches a GPU through pageable memory, one page fault at a time, at a few GB/s;
an 8B model's packets are 128 KiB per token. Read whole (one `readinto` per file, several files on
several threads) into page-locked memory, they copy to the GPU asynchronously at the bus's speed. The
tensors are views of the buffer: nothing is converted or copied on the host.
"""

from __future__ import annotations

import json
import math
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


def read_whole(path: Path, *, pin: bool) -> torch.Tensor:
    """The file's bytes in one uint8 tensor (page-locked when `pin`: needs a GPU build of torch)."""
    size = path.stat().st_size
    buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    view = buffer.numpy().data
    with open(path, "rb", buffering=0) as fh:
        got = 0
        while got < size:
            n = fh.readinto(view[got:])
            if not n:
                raise InvalidInputError(f"{path} was cut short while being read ({got} of {size} bytes)")
            got += n
    return buffer


def parse_safetensors(path: Path, buffer: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors as views of `buffer`, metadata); every offset, shape and dtype checked against the bytes."""
    size = buffer.numel()
    if size < _HEADER_BYTES:
        raise InvalidInputError(f"{path} is not a safetensors file ({size} bytes)")
    header_len = int.from_bytes(buffer[:_HEADER_BYTES].numpy().tobytes(), "little")
    base = _HEADER_BYTES + header_len
    if base > size:
        raise InvalidInputError(f"{path}: its header claims {header_len} bytes, the file has {size}")
    try:
        header: Any = json.loads(buffer[_HEADER_BYTES:base].numpy().tobytes())
        if not isinstance(header, dict):
            raise TypeError("the header must be an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise TypeError("the metadata must be an object")
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"{path}: unreadable safetensors header ({exc})") from None
    tensors = {name: _view(path, buffer, base, name, info) for name, info in header.items()}
    return tensors, {str(k): str(v) for k, v in meta.items()}


def _view(path: Path, buffer: torch.Tensor, base: int, name: str, info: Any) -> torch.Tensor:
    try:
        dtype = _DTYPES[info["dtype"]]
        shape = [int(n) for n in info["shape"]]
        start, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{path}: tensor {name!r} has an unreadable or unsupported entry ({exc})") from None
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(n < 0 for n in shape) or not 0 <= start <= end <= buffer.numel() - base:
        raise InvalidInputError(f"{path}: tensor {name!r} lies outside the file")
    if end - start != math.prod(shape) * itemsize:
        raise InvalidInputError(f"{path}: tensor {name!r} holds {end - start} bytes, its shape {shape} needs more")
    raw = buffer[base + start : base + end]
    if (base + start) % itemsize:  # views need aligned offsets; safetensors writers align, others may not
        raw = raw.clone()
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
