"""`kvpack eval packet`: recompute-free composition against its baselines, in one harness, row by row.

Per row, the passages are the documents. Before timing, every document is cached on its own and
written to a packet store (plain, and wrapped with the adapter). Then each method answers the same
prompt, greedy, and is timed from the start of loading its document caches from disk to the first
new token:

- `full`: full recompute, the plain prompt prefilled (text stuffing; the reference);
- `rerotated`: plain document caches, keys re-rotated to their offsets, nothing recomputed;
- `packet`: adapter-wrapped document caches, re-rotated, nothing recomputed;
- `blend`: CacheBlend-style: `rerotated`, then the ~15% of document tokens whose layer-1 values
  deviate most from a full forward (two layers run to find them) are recomputed;
- `epic`: EPIC-style: `rerotated`, then the first k tokens of every document are recomputed;
- `naive`: plain document caches concatenated as they are (every document at positions 0..n).

The preamble (chat header and instruction, the same for every row) comes from the exact prefix cache.
`recomputed_tokens` counts document tokens whose K/V is computed at query time; `flops` estimates
2 x non-embedding parameters x tokens computed at query time (document tokens recomputed, the
question and answer header, and for `blend` its two-layer pass), attention ignored.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..composition.cache_ops import forward
from ..composition.composed import ComposedCache
from ..composition.rope import rope_spec
from ..engine.engine import Engine
from ..engine.settings import GenerationSettings
from ..errors import InvalidInputError
from ..packet.adapter import PacketAdapter
from ..packet.compose import PacketCache, cache_packet, compose_packets
from ..packet.layout import PacketPrompt, packet_prompt
from ..packet.recompute import recompute_positions, value_deviation
from ..packet.store import load_packet, packet_path, save_packet
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.loader import LoadedModel
from .datasets import QARow
from .machine import machine_info
from .metrics import exact_match, f1_score

METHODS = ("full", "rerotated", "packet", "blend", "epic", "naive")
APPROXIMATE = {"rerotated", "packet", "blend", "epic", "naive"}


@dataclass
class PacketEvalOptions:
    methods: Sequence[str] = METHODS
    max_new_tokens: int = 32
    blend_ratio: float = 0.15
    epic_tokens: int = 8
    max_passages: int | None = None


def _non_embedding_params(loaded: LoadedModel) -> int:
    embed = loaded.model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in loaded.model.parameters()) - embed


class _Harness:
    def __init__(
        self, loaded: LoadedModel, adapter: PacketAdapter | None, store: Path, opts: PacketEvalOptions
    ) -> None:
        self.loaded = loaded
        self.adapter = adapter
        self.store = store
        self.opts = opts
        self.spec = rope_spec(loaded)
        self.engine = Engine(loaded)
        self.params = _non_embedding_params(loaded)
        self.settings = GenerationSettings(max_new_tokens=opts.max_new_tokens)
        self.layers = loaded.fingerprint.num_layers

    def prepare(self, prompt: PacketPrompt) -> None:
        """Cache every document alone (plain and wrapped) in the store, outside any timing."""
        for adapter in (None, self.adapter) if self.adapter is not None else (None,):
            for document in prompt.documents:
                path = packet_path(self.store, document, adapter)
                if not path.is_file():
                    save_packet(path, cache_packet(self.loaded, adapter, document), self.loaded.fingerprint)

    def _load(self, prompt: PacketPrompt, adapter: PacketAdapter | None) -> list[PacketCache]:
        return [
            load_packet(
                packet_path(self.store, d, adapter), self.loaded.fingerprint, self.loaded.dtype, self.loaded.device
            )
            for d in prompt.documents
        ]

    def _preamble(self, prompt: PacketPrompt) -> Any:
        composed = self.engine.compose([*prompt.preamble, 0])  # the shared prefix from the tree
        cache = composed.cache
        if composed.cached_tokens < len(prompt.preamble):
            forward(self.loaded, cache, prompt.preamble[composed.cached_tokens :])
            self.engine.cache_prefix(list(prompt.preamble), [len(prompt.preamble)])
        return cache

    def run(self, method: str, prompt: PacketPrompt) -> tuple[str, float, int, float]:
        """(answer, ttft ms, recomputed document tokens, flops) for one method on one prompt."""
        t0 = time.perf_counter()
        doc_tokens = sum(len(d) for d in prompt.documents)
        if method == "full":
            result = Engine(self.loaded, max_cached_tokens=0).generate(
                prompt.text_ids(), self.settings, strategy="text", started_at=t0
            )
            return result.text, result.usage.ttft_ms, doc_tokens, 2.0 * self.params * len(prompt.text_ids())
        adapter = self.adapter if method == "packet" else None
        if method == "packet" and adapter is None:
            raise InvalidInputError("the packet method needs an adapter")
        packets = self._load(prompt, adapter)
        # naive keeps every document at positions 0..n (no re-rotation): the paper's ablation
        cache = compose_packets(self.loaded, self._preamble(prompt), packets, self.spec, move=method != "naive")
        recomputed, extra = 0, 0.0
        if method in ("blend", "epic"):
            ids = [*prompt.preamble, *(t for d in prompt.documents for t in d)]
            starts, at = [], len(prompt.preamble)
            for d in prompt.documents:
                starts.append(at)
                at += len(d)
            if method == "epic":
                chosen = [
                    s + i for s, d in zip(starts, prompt.documents) for i in range(min(self.opts.epic_tokens, len(d)))
                ]
            else:
                deviation = value_deviation(self.loaded, cache, ids)
                doc_positions = torch.arange(len(prompt.preamble), len(ids))
                k = max(1, round(self.opts.blend_ratio * len(doc_positions)))
                chosen = doc_positions[deviation[doc_positions].topk(k).indices].tolist()
                extra = 2.0 * self.params * len(ids) * 2 / self.layers
            recompute_positions(self.loaded, cache, ids, chosen)
            recomputed = len(chosen)
        composed = ComposedCache(cache, cache.get_seq_length(), method, exact=False)
        state = self.engine.prefill(list(prompt.tail), self.settings, composed=composed, started_at=t0)
        text = "".join(chunk.text for chunk in self.engine.decode(state, self.settings))
        flops = 2.0 * self.params * (recomputed + len(prompt.tail)) + extra
        return text, state.usage.ttft_ms, recomputed, flops


def run_packet_eval(
    loaded: LoadedModel,
    rows: Sequence[QARow],
    adapter: PacketAdapter | None,
    opts: PacketEvalOptions | None = None,
    *,
    store: str | Path | None = None,
    records_path: str | Path | None = None,
    data_name: str = "",
    adapter_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Every method on every row; a summary per method (medians of TTFT, means of the rest)."""
    opts = opts or PacketEvalOptions()
    unknown = set(opts.methods) - set(METHODS)
    if unknown:
        raise InvalidInputError(f"unknown methods {sorted(unknown)}: choose from {', '.join(METHODS)}")
    if "packet" in opts.methods and adapter is None:
        raise InvalidInputError("--methods includes packet but no adapter was given")
    root = Path(store) if store is not None else Path(tempfile.mkdtemp(prefix="kvpack-packets-"))
    harness = _Harness(loaded, adapter, root, opts)
    fmt = KnowledgeFormat()
    records: list[dict[str, Any]] = []
    for index, row in enumerate(tqdm(rows, desc="packet eval", unit="row", disable=not progress)):
        facts = row.gold_first()[: opts.max_passages] if opts.max_passages else row.facts()
        prompt = packet_prompt(loaded.tokenizer, facts, row.question, fmt)
        harness.prepare(prompt)
        order = list(opts.methods) if index % 2 == 0 else list(reversed(opts.methods))  # alternate who goes first
        for method in order:
            text, ttft, recomputed, flops = harness.run(method, prompt)
            records.append(
                {
                    "row": index,
                    "method": method,
                    "answer": text,
                    "em": exact_match(text, row.answers),
                    "f1": f1_score(text, row.answers),
                    "ttft_ms": ttft,
                    "recomputed_tokens": recomputed,
                    "flops": flops,
                    "document_tokens": sum(len(d) for d in prompt.documents),
                }
            )
    if records_path is not None:
        Path(records_path).parent.mkdir(parents=True, exist_ok=True)
        Path(records_path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    summary: dict[str, Any] = {}
    for method in opts.methods:
        mine = [r for r in records if r["method"] == method]
        summary[method] = {
            "f1": statistics.fmean(r["f1"] for r in mine),
            "em": statistics.fmean(r["em"] for r in mine),
            "recomputed_tokens": statistics.fmean(r["recomputed_tokens"] for r in mine),
            "flops": statistics.fmean(r["flops"] for r in mine),
            "ttft_ms": statistics.median(r["ttft_ms"] for r in mine),
            "approximate": method in APPROXIMATE,
            "adapter": adapter_name if method == "packet" else None,
        }
    full = summary.get("full")
    if full is not None:
        for s in summary.values():
            s["f1_vs_full"] = s["f1"] / full["f1"] if full["f1"] else None
            s["ttft_full_over_method"] = full["ttft_ms"] / s["ttft_ms"] if s["ttft_ms"] else None
    return {
        "data": data_name,
        "n": len(rows),
        "model": loaded.name,
        "methods": summary,
        "flops_method": "2 x non-embedding parameters x tokens computed at query time (attention ignored)",
        "blend_ratio": opts.blend_ratio,
        "epic_tokens": opts.epic_tokens,
        "machine": machine_info(),
    }
