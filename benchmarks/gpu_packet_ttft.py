"""Time to first token of packet composition against full recompute at a realistic shape, on a GPU.

A Llama-3.1-8B-shaped model (32 layers, hidden 4096, 32 query and 8 KV heads, MLP 14336, vocabulary
128256, llama3 RoPE scaling) with random bfloat16 weights: its answers mean nothing, so only timings
are reported (F1 comes from the default model's CPU runs). Each shape is n documents of L random
tokens behind the real Llama 3.1 chat template (the test suite's trained tokenizer). Every method goes
through `PacketHarness`, the query path `kvpack eval packet` times: `full` prefills the whole prompt;
the packet methods load every document's cache from the packet store (files written just before, so
read from the page cache), re-rotate the keys and prefill the tail. `packet_resident` is `packet` with
the packets kept on the GPU between queries (`PacketComposer(resident_bytes=...)`), as an agent loop
that composes the same documents again gets them; `packet_host` keeps them in page-locked host memory
instead (`PacketComposer(host_bytes=...)`), so a repeat costs their copy to the GPU but no file read.
Medians of `--repeats` runs after one warm-up; methods alternate order between runs.
`load_variants_ms` times the store's load (each file read whole into page-locked memory, 16 files at
once, copied asynchronously) beside other ways to bring the same packet files onto the GPU, the
memory-mapped load the store used before among them. Results are written after every shape, so a run
cut short keeps what it measured.

Usage: python benchmarks/gpu_packet_ttft.py --out FILE [--shapes 10x150,20x200] [--repeats 5] [--resident-gib 32]
       [--host-gib 16]
       python benchmarks/gpu_packet_ttft.py --tiny --out FILE   (a 2-layer model on the CPU: checks the script)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' tokenizer with the real Llama 3.1 chat template

from kvpack_integrations import KnowledgeFormat, wrap_model  # noqa: E402
from kvpack_integrations.evaluation.machine import machine_info  # noqa: E402
from kvpack_integrations.evaluation.packet_eval import PacketEvalOptions, PacketHarness  # noqa: E402
from kvpack_integrations.packet.adapter import PacketAdapter  # noqa: E402
from kvpack_integrations.packet.composer import PacketComposer  # noqa: E402
from kvpack_integrations.packet.layout import packet_prompt  # noqa: E402
from kvpack_integrations.packet.store import default_load_threads, load_packets, packet_path  # noqa: E402
from tests.support.tiny_models import make_tokenizer  # noqa: E402

SWEEP_THREADS = (1, 4, 16)  # the store's load on other numbers of threads than the composer's
METHODS = ("full", "packet", "rerotated", "blend", "epic")
LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def model_shape(tiny: bool) -> dict[str, Any]:
    return {**LLAMA_31_8B, **(TINY if tiny else {})}


def build_model(device: str, dtype: torch.dtype, tiny: bool) -> Any:
    """The 8B-shaped model built straight on `device` in `dtype` (no fp32 copy on the host)."""
    tokenizer = make_tokenizer("llama")
    config = LlamaConfig(
        **model_shape(tiny),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    weight = model.model.layers[0].self_attn.q_proj.weight.detach()
    if not bool(torch.isfinite(weight).all()) or float(weight.float().std()) == 0.0:
        raise RuntimeError("the random weights were not initialised")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    name = "Llama-3.1-8B-shaped (random weights)" if not tiny else "tiny Llama (random weights)"
    return wrap_model(model, tokenizer, name=name)


def shape_prompt(loaded: Any, documents: int, tokens: int, seed: int) -> Any:
    """The chat template's preamble and tail around `documents` random documents of `tokens` tokens."""
    base = packet_prompt(loaded.tokenizer, ["document"] * documents, "Which one is it?", KnowledgeFormat())
    rng = random.Random(seed)
    vocab = len(loaded.tokenizer)  # ordinary ids: every one decodes
    docs = tuple(tuple(rng.randrange(vocab) for _ in range(tokens)) for _ in range(documents))
    return replace(base, documents=docs)


def load_variants(composer: PacketComposer, documents: Any, repeats: int) -> dict[str, float]:
    """Median ms to bring the documents' packets onto the device, several ways: the composer's store load
    (`load_packets`: each file read whole into page-locked memory, 16 files at once, copied
    asynchronously), the same on one thread, the memory-mapped load the store used before (safetensors'
    `safe_open`, then `.to`), safetensors straight to the device, and safetensors' `load` of the bytes."""
    from safetensors import safe_open
    from safetensors.torch import load as load_bytes

    device = composer.loaded.device
    cuda = device.type == "cuda"
    fingerprint = composer.loaded.fingerprint
    paths = [packet_path(composer.store, d, composer.adapter, fingerprint) for d in documents]
    requests = list(zip(paths, documents))

    def store() -> None:
        composer.load(documents, "packet")

    def store_threads(threads: int) -> Any:
        return lambda: load_packets(
            requests, fingerprint, composer.loaded.dtype, device, composer.adapter, threads=threads
        )

    def mapped() -> None:
        for path in paths:
            with safe_open(str(path), framework="pt") as fh:
                fh.get_tensor("keys").to(device), fh.get_tensor("values").to(device)

    def read_whole() -> None:
        for path in paths:
            tensors = load_bytes(path.read_bytes())
            tensors["keys"].to(device), tensors["values"].to(device)

    def to_device() -> None:
        for path in paths:
            with safe_open(str(path), framework="pt", device=str(device)) as fh:
                fh.get_tensor("keys"), fh.get_tensor("values")

    packets, _ = composer.load(documents, "packet")  # the page-locked, asynchronous path: bit for bit the file
    for packet, path in zip(packets, paths):
        with safe_open(str(path), framework="pt") as fh:
            same = [torch.equal(fh.get_tensor(n).to(device), getattr(packet, n)) for n in ("keys", "values")]
        if not all(same):
            raise RuntimeError(f"the store's load of {path} differs from the file")
    ways = {
        "store": store,
        **{f"store_{n}_threads": store_threads(n) for n in SWEEP_THREADS},
        "mapped_previous_store": mapped,
        "read_whole": read_whole,
        "safetensors_to_device": to_device,
    }
    out = {}
    for name, way in ways.items():
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            way()
            if cuda:
                torch.cuda.synchronize()
            runs.append((time.perf_counter() - t0) * 1000)
        out[name] = statistics.median(runs)
    return out


def time_shape(
    harness: PacketHarness,
    resident: PacketHarness,
    host: PacketHarness,
    loaded: Any,
    documents: int,
    tokens: int,
    repeats: int,
) -> dict[str, Any]:
    prompt = shape_prompt(loaded, documents, tokens, seed=documents * 100_003 + tokens)
    t0 = time.perf_counter()
    harness.prepare(prompt)  # index time: every document cached alone and stored, plain and wrapped
    index_s = time.perf_counter() - t0
    resident.composer.resident.clear()  # the last shape's packets leave the GPU
    host.composer.host.clear()  # and the host tier
    hits_before = resident.composer.resident.hits
    host_hits_before = host.composer.host.hits
    runners = {m: (harness, m) for m in harness.methods}
    if "packet" in harness.methods:
        runners["packet_resident"] = (resident, "packet")  # its warm-up run makes the packets resident
        runners["packet_host"] = (host, "packet")  # its warm-up run fills the host tier
    times: dict[str, list[float]] = {m: [] for m in runners}
    recomputed: dict[str, int] = {}
    for run in range(repeats + 1):
        order = list(runners) if run % 2 == 0 else list(reversed(runners))
        for name in order:
            runner, method = runners[name]
            _, ttft, recomputed[name], _ = runner.run(method, prompt)
            if run:  # run 0 warms up kernels and allocator
                times[name].append(ttft)
    variants = load_variants(harness.composer, prompt.documents, repeats)
    median = {m: statistics.median(v) for m, v in times.items()}
    return {
        "documents": documents,
        "tokens_per_document": tokens,
        "prompt_tokens": len(prompt.text_ids()),
        "tail_tokens": len(prompt.tail),
        "index_seconds": index_s,
        "ttft_ms": median,
        "ttft_ms_runs": times,
        "full_over_method": {m: median["full"] / v for m, v in median.items() if "full" in median},
        "recomputed_tokens": recomputed,
        "packet_load_ms": variants["store"],
        "load_variants_ms": variants,
        "resident_packets": len(resident.composer.resident),
        "resident_hits": resident.composer.resident.hits - hits_before,
        "host_packets": len(host.composer.host),
        "host_bytes": host.composer.host.used_bytes,
        "host_hits": host.composer.host.hits - host_hits_before,
    }


def profile(
    harness: PacketHarness, resident: PacketHarness, host: PacketHarness, loaded: Any, documents: int, tokens: int
) -> str:
    """torch.profiler tables of one `packet`, `packet_resident` and `packet_host` run of a shape: where the
    time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    prompt = shape_prompt(loaded, documents, tokens, seed=documents * 100_003 + tokens)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if loaded.device.type == "cuda" else [])
    tables = []
    for name, runner in (("packet", harness), ("packet_resident", resident), ("packet_host", host)):
        runner.run("packet", prompt)  # warm (and fill the resident or host tier)
        with torch_profile(activities=activities) as prof:
            runner.run("packet", prompt)
        for key in ("cpu_time_total", "self_cpu_time_total") + (
            ("self_device_time_total",) if len(activities) > 1 else ()
        ):
            table = prof.key_averages().table(sort_by=key, row_limit=25)
            tables.append(f"## {name} {documents}x{tokens}, sorted by {key}\n{table}")
    return "\n\n".join(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="10x150,20x200,32x256,64x256,64x512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--resident-gib", type=int, default=32, help="device memory for resident packets")
    parser.add_argument("--host-gib", type=int, default=16, help="page-locked host memory for the host tier")
    parser.add_argument(
        "--load-threads", type=int, default=None, help="packet files read at once (default: the store's)"
    )
    parser.add_argument(
        "--profile", default=None, help="a shape (NxL) to profile after timing; tables to OUT.profile.txt"
    )
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    loaded = build_model(device, dtype, args.tiny)
    build_s = time.perf_counter() - t0
    adapter = PacketAdapter.initial(loaded)  # untrained soft tokens: the same cost as trained ones
    with tempfile.TemporaryDirectory(prefix="kvpack-gpu-packets-") as store:  # GiBs of packets: removed at the end
        run(args, loaded, adapter, build_s, dtype, device, Path(store))


def _resumed(out: Path, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Shapes an earlier run of the same configuration measured into `out` (a device session may end
    mid-run); another configuration's results are refused, not overwritten."""
    if not out.is_file():
        return []
    earlier = json.loads(out.read_text())
    keys = ("model", "config", "dtype", "device", "repeats", "load_threads", "methods")
    differ = [k for k in keys if earlier.get(k) != result[k]]
    if differ:
        raise SystemExit(
            f"{out} holds results of another configuration ({', '.join(differ)}): remove it or pass another --out"
        )
    return list(earlier.get("shapes", []))


def _clear(store: Path) -> None:
    for child in store.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def run(
    args: argparse.Namespace,
    loaded: Any,
    adapter: PacketAdapter,
    build_s: float,
    dtype: torch.dtype,
    device: str,
    store: Path,
) -> None:
    """Time every shape not yet in `--out`, writing the results after each one."""
    composer = PacketComposer(loaded, store, adapter, resident_bytes=0, host_bytes=0, load_threads=args.load_threads)
    options = PacketEvalOptions(methods=args.methods.split(","), max_new_tokens=1)
    harness = PacketHarness(loaded, composer, options)
    on_device = PacketComposer(loaded, composer.store, adapter, resident_bytes=args.resident_gib << 30, host_bytes=0)
    resident = PacketHarness(loaded, on_device, options)
    in_host = PacketComposer(
        loaded,
        composer.store,
        adapter,
        resident_bytes=0,
        host_bytes=args.host_gib << 30,
        load_threads=args.load_threads,
    )
    host = PacketHarness(loaded, in_host, options)
    result: dict[str, Any] = {
        "model": loaded.name,
        "config": model_shape(args.tiny),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "build_seconds": build_s,
        "repeats": args.repeats,
        "load_threads": args.load_threads or default_load_threads(loaded.device),
        "ttft": "median ms from the start of loading the document caches (packet methods) or of the "
        "prefill (full) to the first new token, as `kvpack eval packet` times it",
        "machine": machine_info(),
        "methods": args.methods,
        "shapes": [],
    }
    out = Path(args.out)
    result["shapes"] = _resumed(out, result)
    done = {(r["documents"], r["tokens_per_document"]) for r in result["shapes"]}
    for shape in args.shapes.split(","):
        documents, tokens = (int(x) for x in shape.split("x"))
        if (documents, tokens) in done:
            continue  # measured by an earlier, interrupted run of the same configuration
        row = time_shape(harness, resident, host, loaded, documents, tokens, args.repeats)
        result["shapes"].append(row)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: row[k] for k in ("prompt_tokens", "ttft_ms", "full_over_method", "load_variants_ms")}))
        sys.stdout.flush()
        if shape != args.profile:
            _clear(store)  # this shape's packets (GiBs at 64x512) leave the disk
    if args.profile:
        documents, tokens = (int(x) for x in args.profile.split("x"))
        if (documents, tokens) in done:  # its packets went with the earlier run: cache them again
            harness.prepare(shape_prompt(loaded, documents, tokens, seed=documents * 100_003 + tokens))
        out.with_suffix(".profile.txt").write_text(profile(harness, resident, host, loaded, documents, tokens) + "\n")


if __name__ == "__main__":
    main()
