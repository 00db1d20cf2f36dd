"""Ways to read packet files on this CPU: does the store's whole-file read cost anything here?

The store (`load_packets`) reads each file whole into one buffer (page-locked on a GPU, so the copy to
the device is asynchronous; `gpu_packet_ttft.py` times that there) and checks it; on a CPU it reads one
file after another. The alternatives: the memory-mapped load the store used before (safetensors'
`safe_open`, copying from the page cache as the tensors are used), safetensors' `load` of the bytes,
and files spread over threads. Here they are timed on packet files of
the default model's shape (30 layers, 3 KV heads of 64, float32 as the CPU store holds them, or
`--dtype bfloat16`, 180 positions: a document of 164
tokens in 16 soft tokens), written by the product's own `save_packet`, with the page cache warm and
with the files' pages evicted first (`posix_fadvise(DONTNEED)`: a store larger than memory). Every way
copies every byte once (as composition does), so a lazy map is not timed as free. Medians of
`--repeats` runs.

Usage: python benchmarks/packet_load_cpu.py --out FILE [--files 20] [--repeats 7] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvpack_integrations.evaluation.machine import machine_info
from kvpack_integrations.packet.compose import PacketCache
from kvpack_integrations.packet.store import load_packet, save_packet
from kvpack_integrations.runtime.fingerprint import Fingerprint

LAYERS, KV_HEADS, HEAD_DIM, TOKENS = 30, 3, 64, 180
DTYPE = torch.float32  # set from --dtype before any file is written


def fingerprint() -> Fingerprint:
    return Fingerprint(
        "LlamaForCausalLM", LAYERS, KV_HEADS, HEAD_DIM, 49152, "bench", "bench", str(DTYPE).removeprefix("torch.")
    )


def write_packets(root: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        kv = [torch.randn(LAYERS, KV_HEADS, TOKENS, HEAD_DIM, generator=g).to(DTYPE) for _ in range(2)]
        packet = PacketCache(tuple(range(i, i + TOKENS)), kv[0], kv[1])
        paths.append(save_packet(root / f"{i}.safetensors", packet, fingerprint()))
    return paths


def store(path: Path) -> None:
    document = tuple(range(int(path.stem), int(path.stem) + TOKENS))
    packet = load_packet(path, fingerprint(), DTYPE, "cpu", document, None)
    packet.keys.clone(), packet.values.clone()  # one copy of every byte, as composition makes


def mapped(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        fh.get_tensor("keys").clone(), fh.get_tensor("values").clone()  # the same one copy


def read_whole(path: Path) -> None:
    from safetensors.torch import load

    tensors = load(path.read_bytes())
    tensors["keys"].clone(), tensors["values"].clone()  # the same one copy


WAYS = (("store (read whole, checked)", store), ("mapped", mapped), ("safetensors load of the bytes", read_whole))


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(paths: list[Path], one: Callable[[Path], None], threads: int, cold: bool, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        if cold:
            evict(paths)
        t0 = time.perf_counter()
        if threads == 1:
            for path in paths:
                one(path)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, paths))
        runs.append((time.perf_counter() - t0) * 1000)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    global DTYPE
    DTYPE = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="kvpack-load-") as tmp:
        paths = write_packets(Path(tmp), args.files)
        size = sum(p.stat().st_size for p in paths)
        rows = []
        for cold in (False, True):
            for name, one in WAYS:
                for threads in (1, 2, 8):
                    ms = timed(paths, one, threads, cold, args.repeats)
                    cache = "evicted" if cold else "warm"
                    rows.append({"way": name, "threads": threads, "page_cache": cache, "ms": ms})
                    print(json.dumps(rows[-1]))
    result = {
        "files": args.files,
        "bytes": size,
        "packet_shape": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "tokens": TOKENS},
        "dtype": args.dtype,
        "repeats": args.repeats,
        "machine": machine_info(),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
