"""Tensor files read whole into one buffer (the packet store's load): the same tensors as safetensors
reads, every damaged header refused by name, and packet batches loaded on threads in request order."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvpack_integrations.errors import CorruptSegmentError, FingerprintMismatchError, InvalidInputError
from kvpack_integrations.packet.compose import PacketCache
from kvpack_integrations.packet.store import load_packets, save_packet
from kvpack_integrations.runtime.fingerprint import Fingerprint
from kvpack_integrations.segments.whole_tensor_file import parse_safetensors, read_tensor_file_whole, read_whole

FINGERPRINT = Fingerprint("LlamaForCausalLM", 2, 2, 4, 100, "test", "test", "bfloat16")


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "f32": torch.randn(7, generator=g),
        "f16": torch.randn(2, 3, generator=g).half(),
        "i64": torch.arange(-5, 6),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }


def handmade(path, header: object, data: bytes = b"", pad: int = 0) -> None:
    """A safetensors-shaped file with any header, padded to move the data to an odd offset."""
    raw = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_read_whole_gives_what_safetensors_reads(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    save_file(tensors(), str(path), metadata={"format": "x"})
    got, meta = parse_safetensors(path, read_whole(path, pin=False))
    want = load_file(str(path))
    assert meta == {"format": "x"} and set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_unaligned_tensors_are_copied_not_misread(tmp_path) -> None:
    """safetensors' writer aligns the data; another writer may not, and a view cannot start mid-element."""
    values = torch.tensor([1.5, -2.25, 3.0])
    header = {"v": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}
    for pad in range(4):
        path = tmp_path / f"pad{pad}.safetensors"
        handmade(path, header, values.numpy().tobytes(), pad)
        got, _ = parse_safetensors(path, read_whole(path, pin=False))
        assert torch.equal(got["v"], values), pad


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ([1, 2], b"", "header must be an object"),
        ({"__metadata__": [1]}, b"", "metadata must be an object of strings"),
        ({"__metadata__": {"n": 1}}, b"", "metadata must be an object of strings"),
        ({"v": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "end at byte"),
        ({"v": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "shape \\[3\\] needs 12"),
        ({"v": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "integers >= 0"),
        ({"v": {"dtype": "F32", "shape": [2.9], "data_offsets": [0, 8]}}, b"\0" * 8, "integers >= 0"),
        ({"v": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "integers >= 0"),
        ({"v": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, b"\0" * 8, "integers >= 0"),
        ({"v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "outside the file"),
        ({"v": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, "a list of 2 integers"),
        ({"v": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported entry"),
        ({"v": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unsupported entry"),
        ({"v": "F32"}, b"", "unsupported entry"),
        ({"k": F32x2, "v": F32x2}, b"\0" * 8, "does not start where the one before it ends"),  # overlapping
        ({"v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "does not start where"),  # gap
        ({"v": F32x2}, b"\0" * 12, "end at byte"),  # bytes after the last tensor
    ],
)
def test_damaged_headers_are_refused_by_name(tmp_path, header, data, message) -> None:
    path = tmp_path / "bad.safetensors"
    handmade(path, header, data)
    with pytest.raises(InvalidInputError, match=message) as info:
        parse_safetensors(path, read_whole(path, pin=False))
    assert str(path) in str(info.value)


def test_short_and_empty_files_are_refused(tmp_path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\1\2")
    with pytest.raises(InvalidInputError, match="not a safetensors file"):
        parse_safetensors(path, read_whole(path, pin=False))
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(InvalidInputError, match="header claims 1000 bytes"):
        parse_safetensors(path, read_whole(path, pin=False))
    path.write_bytes(struct.pack("<Q", 4) + b"{nop")
    with pytest.raises(InvalidInputError, match="unreadable safetensors header"):
        parse_safetensors(path, read_whole(path, pin=False))
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(InvalidInputError, match="header claims 1000000000 bytes"):
        parse_safetensors(path, read_whole(path, pin=False))
    for raw in (
        b'{"v": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}',
        b"[" * 100_000 + b"]" * 100_000,
    ):
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
        with pytest.raises(InvalidInputError, match="unreadable"):
            parse_safetensors(path, read_whole(path, pin=False))
    with pytest.raises(InvalidInputError, match="packet file not found"):
        read_tensor_file_whole(tmp_path / "missing", file_format="f", what="packet")


def packet(seed: int, tokens: int) -> PacketCache:
    g = torch.Generator().manual_seed(seed)
    kv = [torch.randn(2, 2, tokens, 4, generator=g).bfloat16() for _ in range(2)]
    return PacketCache(tuple(range(seed, seed + tokens)), kv[0], kv[1])


def test_packet_batches_load_in_request_order_on_threads(tmp_path) -> None:
    packets = [packet(seed, 3 + seed % 4) for seed in range(12)]
    requests = [(save_packet(tmp_path / f"{i}.safetensors", p, FINGERPRINT), p.document) for i, p in enumerate(packets)]
    requests.reverse()  # not the order they were written in
    for threads in (1, 4):
        got = load_packets(requests, FINGERPRINT, torch.bfloat16, "cpu", None, threads=threads)
        assert [p.document for p in got] == [d for _, d in requests]
        for back, (_, document) in zip(got, requests):
            want = packets[document[0]]
            assert torch.equal(back.keys, want.keys) and torch.equal(back.values, want.values)
    with pytest.raises(InvalidInputError, match="threads must be >= 1"):
        load_packets(requests, FINGERPRINT, torch.bfloat16, "cpu", None, threads=0)


def test_one_bad_file_in_a_threaded_batch_is_named(tmp_path) -> None:
    packets = [packet(seed, 5) for seed in range(6)]
    requests = [(save_packet(tmp_path / f"{i}.safetensors", p, FINGERPRINT), p.document) for i, p in enumerate(packets)]
    bad = requests[3][0]
    bad.write_bytes(bad.read_bytes()[:-7])  # cut short after it was written
    with pytest.raises(InvalidInputError, match=f"{bad.name}: its tensors end at byte"):
        load_packets(requests, FINGERPRINT, torch.bfloat16, "cpu", None, threads=3)
    swapped = [requests[0], (requests[1][0], requests[2][1])]  # a file holding another document
    with pytest.raises(CorruptSegmentError, match="another document"):
        load_packets(swapped, FINGERPRINT, torch.bfloat16, "cpu", None, threads=2)
    other = Fingerprint("LlamaForCausalLM", 2, 2, 4, 100, "test", "other", "bfloat16")
    with pytest.raises(FingerprintMismatchError, match="another model"):
        load_packets(requests[:2], other, torch.bfloat16, "cpu", None, threads=2)
