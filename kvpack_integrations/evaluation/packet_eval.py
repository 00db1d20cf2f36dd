"""`kvpack eval packet`: recompute-free composition against its baselines, in one harness, row by row.

Per row, the passages are the documents. Before timing, every document is cached on its own and
written to a packet store (plain, and wrapped with the adapter). Then each method answers the same
prompt, greedy, and is timed from the start of loading its document caches from the store to the first
new token. Every method starts from the same store state: just before its timing, its own packet files
are read once, so each loads them from the page cache (methods share files: `rerotated`, `blend`,
`epic` and `naive` read the plain ones, so without this whichever ran first paid the disk for the
others). A method that would build a packet inside its timing is an error, not a slower figure:

- `full`: full recompute, the plain prompt prefilled (text stuffing; the reference);
- `rerotated`: plain document caches, keys re-rotated to their offsets, nothing recomputed;
- `packet`: adapter-wrapped document caches, re-rotated, nothing recomputed;
- `blend`: CacheBlend-style: `rerotated`, then the ~15% of document tokens whose layer-1 values
  deviate most from a full forward (two layers run to find them) are recomputed;
- `epic`: EPIC-style: `rerotated`, then the first k tokens of every document are recomputed;
- `naive`: plain document caches concatenated as they are (every document at positions 0..n).

The preamble (chat header and instruction, the same for every row) comes from the exact prefix cache
for the approximate methods; `full` prefills it with the rest (text stuffing: 28 tokens of the default
model's ~1,900, about 1.5% of its prefill). Scoring is SQuAD v1.1's (ASCII punctuation only).
`recomputed_tokens` counts document tokens whose K/V is computed at query time; `flops` estimates
2 x non-embedding parameters x tokens computed at query time (document tokens recomputed, the
question and answer header, and for `blend` its two-layer pass), attention ignored.
`f1_vs_full_ci95` is a paired bootstrap interval (rows resampled, 2,000 times) of F1(method) /
F1(full): on a small model that ratio rests on a few overlapping words per row.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..engine.engine import Engine
from ..engine.settings import GenerationSettings
from ..errors import InvalidInputError
from ..packet.adapter import PacketAdapter
from ..packet.composer import PacketComposer
from ..packet.layout import PacketPrompt, packet_prompt
from ..packet.store import adapter_id, packet_path
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.loader import LoadedModel
from ..runtime.paths import usable_file
from .bootstrap import ratio_interval
from .datasets import QARow
from .machine import machine_info
from .metrics import exact_match, f1_score, text_f1
from .records import RecordLog

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


class PacketHarness:
    """Every method's query path, timed as `kvpack eval packet` times it (also used at other shapes)."""

    def __init__(self, loaded: LoadedModel, composer: PacketComposer, opts: PacketEvalOptions) -> None:
        self.loaded = loaded
        self.composer = composer
        self.engine = Engine(loaded)
        self.params = _non_embedding_params(loaded)
        self.settings = GenerationSettings(max_new_tokens=opts.max_new_tokens)
        self.layers = loaded.fingerprint.num_layers
        self.methods = opts.methods

    def prepare(self, prompt: PacketPrompt) -> None:
        """Cache every document alone (plain and wrapped, as the methods need) in the store, untimed. Stored
        files are read and checked too: a damaged one is replaced now, not inside a method's timing."""
        if any(m not in ("full", "packet") for m in self.methods):
            self.composer.load(prompt.documents, "rerotated")
        if "packet" in self.methods:
            self.composer.load(prompt.documents, "packet")

    def warm(self, method: str, prompt: PacketPrompt) -> None:
        """Read the method's packet files once, so its timing loads them from the page cache like every
        other method's (untimed)."""
        if method == "full":
            return
        key = adapter_id(self.composer.adapter_for(method))
        for document in prompt.documents:
            path = packet_path(self.composer.store, document, key, self.loaded.fingerprint)
            if path.is_file():
                path.read_bytes()

    def run(self, method: str, prompt: PacketPrompt) -> tuple[str, float, int, float]:
        """(answer, ttft ms, recomputed document tokens, flops) for one method on one prompt."""
        self.warm(method, prompt)
        t0 = time.perf_counter()
        if method == "full":
            result = Engine(self.loaded, max_cached_tokens=0).generate(
                prompt.text_ids(), self.settings, strategy="text", started_at=t0
            )
            doc_tokens = sum(len(d) for d in prompt.documents)
            return result.text, result.usage.ttft_ms, doc_tokens, 2.0 * self.params * len(prompt.text_ids())
        composition = self.composer.compose(self.engine, prompt, method)
        if composition.packets_built:
            raise RuntimeError(
                f"{method}: {composition.packets_built} packets were built inside the timing; prepare() must "
                "store every document's packet first"
            )
        state = self.engine.prefill(list(prompt.tail), self.settings, composed=composition.composed, started_at=t0)
        text = "".join(chunk.text for chunk in self.engine.decode(state, self.settings))
        flops = 2.0 * self.params * (composition.recomputed_tokens + len(prompt.tail))
        flops += 2.0 * self.params * composition.selection_tokens * 2 / self.layers  # blend's two-layer pass
        return text, state.usage.ttft_ms, composition.recomputed_tokens, flops


def _setup(loaded: LoadedModel, opts: PacketEvalOptions, adapter: PacketAdapter | None, method: str) -> dict[str, Any]:
    """What a record's answer depends on besides its row: a resumed run must not mix in other settings."""
    return {
        "model": loaded.fingerprint.digest,
        "device": str(loaded.device),  # timings are only comparable on one machine and thread count
        "threads": torch.get_num_threads(),
        "max_new_tokens": opts.max_new_tokens,
        "max_passages": opts.max_passages,
        **({"blend_ratio": opts.blend_ratio} if method == "blend" else {}),
        **({"epic_tokens": opts.epic_tokens} if method == "epic" else {}),
        **({"adapter": adapter_id(adapter)} if method == "packet" else {}),
    }


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
    if store is None:  # a temporary store: its packets (gigabytes for a long run) go with it
        with tempfile.TemporaryDirectory(prefix="kvpack-packets-") as temporary:
            return run_packet_eval(
                loaded,
                rows,
                adapter,
                opts,
                store=temporary,
                records_path=records_path,
                data_name=data_name,
                adapter_name=adapter_name,
                progress=progress,
            )
    root = Path(store)
    composer = PacketComposer(  # no resident or host tier (whatever the environment says): every query loads
        loaded,  # its packets from the store, inside the timing
        root,
        adapter,
        blend_ratio=opts.blend_ratio,
        epic_tokens=opts.epic_tokens,
        resident_bytes=0,
        host_bytes=0,
    )
    harness = PacketHarness(loaded, composer, opts)
    fmt = KnowledgeFormat()
    out = usable_file(records_path, "records file") if records_path is not None else None
    if not rows:
        raise InvalidInputError("no rows to evaluate")
    if opts.max_new_tokens < 1 or (opts.max_passages is not None and opts.max_passages < 1):
        raise InvalidInputError(
            f"max_new_tokens and max_passages must be >= 1, got {opts.max_new_tokens} and {opts.max_passages}"
        )

    log = RecordLog(
        out, lambda method: _setup(loaded, opts, adapter, method), [row.digest() for row in rows], part="method"
    )
    for index, row in enumerate(tqdm(rows, desc="packet eval", unit="row", disable=not progress)):
        todo = [m for m in opts.methods if not log.done(index, m)]
        if not todo:
            continue
        prompt = packet_prompt(loaded.tokenizer, row.documents(opts.max_passages), row.question, fmt)
        harness.prepare(prompt)
        order = todo if index % 2 == 0 else list(reversed(todo))  # alternate who goes first
        fresh = []
        for method in order:
            text, ttft, recomputed, flops = harness.run(method, prompt)
            fresh.append(
                {
                    "question": row.question,
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
        log.add_all(index, fresh)  # row by row, so an interrupted run resumes from here
    records = [r for r in log.ordered() if r["method"] in opts.methods]
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
        full_answers = {r["row"]: r["answer"] for r in records if r["method"] == "full"}
        full_f1 = {r["row"]: r["f1"] for r in records if r["method"] == "full"}
        for method, s in summary.items():
            s["f1_vs_full"] = s["f1"] / full["f1"] if full["f1"] else None
            s["ttft_full_over_method"] = full["ttft_ms"] / s["ttft_ms"] if s["ttft_ms"] else None
            pairs = [(r["answer"], full_answers[r["row"]]) for r in records if r["method"] == method]
            s["agreement_f1"] = statistics.fmean(text_f1(a, b) for a, b in pairs)  # answer vs full's answer
            f1_of = {r["row"]: r["f1"] for r in records if r["method"] == method}
            rows = sorted(f1_of.keys() & full_f1.keys())
            interval = ratio_interval([f1_of[i] for i in rows], [full_f1[i] for i in rows]) if rows else None
            s["f1_vs_full_ci95"] = list(interval) if interval is not None else None  # paired bootstrap over rows
            s["same_as_full"] = statistics.fmean(float(a == b) for a, b in pairs)
    return {
        "data": data_name,
        "n": len(rows),
        "model": loaded.name,
        "methods": summary,
        "flops_method": "2 x non-embedding parameters x tokens computed at query time (attention ignored)",
        "ttft_store": "each method's packet files read once just before its timing: loaded from the page cache",
        "blend_ratio": opts.blend_ratio,
        "epic_tokens": opts.epic_tokens,
        "records_set_aside": log.set_aside,  # records of other settings in the records file, not reused
        "machine": machine_info(),
    }
