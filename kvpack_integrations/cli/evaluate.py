"""`kvpack eval equivalence|accumulation|routing|steering|packet`: each measured side by side in one run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..evaluation.accumulation import run_accumulation
from ..evaluation.datasets import load_rows
from ..evaluation.equivalence import EquivalenceOptions, run_equivalence
from ..evaluation.packet_eval import METHODS as PACKET_METHODS
from ..evaluation.packet_eval import PacketEvalOptions, run_packet_eval
from ..evaluation.routing import load_routing_rows, run_routing
from ..evaluation.steering import SteeringEvalOptions, run_steering
from ..knowledge.knowledge_base import DEFAULT_LEXICAL_WEIGHT, KnowledgeBase
from ..packet.adapter import PacketAdapter
from ..runtime.default_model import kvpack_home
from .common import (
    add_adapter_arg,
    add_chroma_args,
    add_common_args,
    chosen_adapter,
    chroma_location,
    emit,
    loaded_model,
    pack_store,
    positive_int,
    refuse_unused,
)

DEFAULT_ROUTING_ANSWER_TOKENS = 24


def _shared(p: argparse.ArgumentParser, *, store: bool) -> None:
    p.add_argument("--data", required=True, type=Path, help="JSONL rows {question, answers[], contexts[...]}")
    p.add_argument("--limit", type=positive_int, default=None, help="first N rows")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--records", type=Path, default=None, help="per-row JSONL; an interrupted run resumes from it")
    p.add_argument("--output", type=Path, default=None, help="also write the summary JSON here")
    add_common_args(p, store=store)


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="eval_command", required=True)
    p = ev.add_parser("equivalence", help="answers from stored packs vs from text, per row")
    p.add_argument("--gold-only", action="store_true", help="only the supporting passages")
    p.add_argument("--raw", action="store_true", help="also answer from packs of raw, untemplated text (ablation)")
    p.add_argument("--keep-packs", action="store_true", help="keep the per-row packs in the store")
    _shared(p, store=True)
    p.set_defaults(run=run_equivalence_cmd)
    p = ev.add_parser("routing", help="banked routing over a knowledge base of every fact in a file")
    p.add_argument("--facts", required=True, type=Path, help="JSONL rows {fact, question, answer}")
    p.add_argument(
        "--limit", type=positive_int, default=None, help="sample N of the questions (the KB holds every fact)"
    )
    p.add_argument("--k", type=positive_int, default=1, help="facts routed per question")
    p.add_argument("--probes", type=positive_int, default=1, help="nearest banks searched")
    p.add_argument(
        "--lexical-weight",
        type=float,
        default=DEFAULT_LEXICAL_WEIGHT,
        help="weight of BM25 in the hybrid score (0: the paper's dense-only routing)",
    )
    p.add_argument(
        "--dims", type=positive_int, default=None, help="store PCA-reduced routing vectors (new knowledge bases)"
    )
    add_chroma_args(p, kb_dir_help="Chroma directory (default: a new one under $KVPACK_HOME)")
    p.add_argument("--routing-only", action="store_true", help="skip the answers (no language model)")
    p.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_ROUTING_ANSWER_TOKENS)
    p.add_argument("--output", type=Path, default=None, help="also write the summary JSON here")
    add_common_args(p, store=False)
    p.set_defaults(run=run_routing_cmd)
    p = ev.add_parser("steering", help="the paper's steering tables: alpha sweep, layers, composition, dual channel")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="QA JSONL for the dual channel (default ../shared/data/hotpotqa_dev_300)",
    )
    p.add_argument("--limit", type=positive_int, default=100, help="dual-channel rows")
    p.add_argument("--tasks", type=positive_int, default=None, help="use only the first N code tasks")
    p.add_argument("--alphas", default="0.25,0.5,0.75,1,1.5,2", help="comma-separated sweep alphas")
    p.add_argument("--layers", default="mid,late", help="comma-separated layer ranges of the alpha sweep")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="per code reply")
    p.add_argument("--dual-max-new-tokens", type=positive_int, default=16, help="per dual-channel answer")
    p.add_argument("--records", type=Path, default=None, help="write every reply here (JSONL)")
    p.add_argument("--output", type=Path, default=None, help="also write the summary JSON here")
    add_common_args(p, store=False)
    p.set_defaults(run=run_steering_cmd)
    p = ev.add_parser("packet", help="KV Packet vs full recompute and the other baselines, row by row")
    p.add_argument("--data", type=Path, required=True, help="QA JSONL {question, answers, contexts}")
    p.add_argument("--limit", type=positive_int, default=None)
    add_adapter_arg(p)
    p.add_argument(
        "--methods", default=",".join(PACKET_METHODS), help="comma-separated, from " + ", ".join(PACKET_METHODS)
    )
    p.add_argument(
        "--max-passages", type=positive_int, default=None, help="passages per row, gold first (default: all)"
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument(
        "--packet-store",
        "--packets",
        dest="packets",
        type=Path,
        default=None,
        help="packet store directory (default: a temporary one, removed at the end)",
    )
    p.add_argument("--records", type=Path, default=None, help="write every answer here (JSONL)")
    p.add_argument("--output", type=Path, default=None, help="also write the summary JSON here")
    add_common_args(p, store=False)
    p.set_defaults(run=run_packet_cmd)
    p = ev.add_parser("accumulation", help="knowledge growing by one passage per step, KV vs RAG")
    p.add_argument("--steps", type=positive_int, default=5)
    _shared(p, store=False)
    p.set_defaults(run=run_accumulation_cmd)


def _finish(args: argparse.Namespace, summary: dict[str, Any], text: str) -> int:
    """Write --output, then print; a file that cannot be written loses no results (they are printed,
    with the reason) and the exit code says it failed."""
    if args.output:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        except OSError as exc:
            summary = {**summary, "output_error": f"could not write {args.output}: {exc}"}
            emit(args, summary, text + f"\n{summary['output_error']}")
            return 2
    emit(args, summary, text)
    return 0


def run_equivalence_cmd(args: argparse.Namespace) -> int:
    rows = load_rows(args.data, args.limit)
    loaded = loaded_model(args)
    opts = EquivalenceOptions(
        gold_only=args.gold_only, raw=args.raw, max_new_tokens=args.max_new_tokens, keep_packs=args.keep_packs
    )
    s = run_equivalence(loaded, rows, pack_store(args), opts, records_path=args.records, data_name=args.data.name)
    text = (
        f"equivalence on {s['n']} rows of {args.data.name} ({s['passages_per_row']:.1f} passages each), {s['model']}\n"
        f"  divergences: {s['divergences']}\n"
        f"  EM  kv {s['em_kv']:.3f}  rag {s['em_rag']:.3f}    F1 kv {s['f1_kv']:.3f}  rag {s['f1_rag']:.3f}\n"
        f"  prompt tokens prefilled: kv {s['prompt_tokens_kv']:.1f}  rag {s['prompt_tokens_rag']:.1f}"
        f"  ({100 * s['prompt_token_ratio']:.1f}%)\n"
        f"  median TTFT: kv {s['ttft_ms_kv']:.0f} ms  rag {s['ttft_ms_rag']:.0f} ms  (x{s['ttft_ratio']:.1f})"
    )
    if args.raw:
        text += f"\n  raw (untemplated) KV: EM {s['em_kv_raw']:.3f} ({s['em_raw_minus_kv']:+.3f} vs templated KV)"
    return _finish(args, s, text)


def run_accumulation_cmd(args: argparse.Namespace) -> int:
    rows = load_rows(args.data, args.limit)
    loaded = loaded_model(args)
    s = run_accumulation(
        loaded,
        rows,
        args.steps,
        max_new_tokens=args.max_new_tokens,
        records_path=args.records,
        data_name=args.data.name,
    )
    lines = [
        f"accumulation on {s['n']} rows of {args.data.name}, {s['model']}",
        "  k  EM kv  EM rag  identical  tokens kv (+new passage)  tokens rag  savings (incl. new passage)",
    ]
    for st in s["steps"]:
        lines.append(
            f"  {st['k']}  {st['em_kv']:.3f}  {st['em_rag']:.3f}   {st['identical']:>4}/{s['n']:<4}"
            f"  {st['tokens_kv']:>8.1f} (+{st['build_tokens_kv']:.1f})  {st['tokens_rag']:>9.1f}"
            f"  {100 * st['savings']:.1f}% ({100 * st['savings_incl_build']:.1f}%)"
        )
    return _finish(args, s, "\n".join(lines))


def run_steering_cmd(args: argparse.Namespace) -> int:
    data = args.data or Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hotpotqa_dev_300.jsonl"
    rows = load_rows(data, args.limit)
    try:
        alphas = tuple(float(a) for a in args.alphas.split(","))
    except ValueError:
        raise InvalidInputError(f"--alphas must be comma-separated numbers, got {args.alphas!r}") from None
    opts = SteeringEvalOptions(
        alphas=alphas,
        sweep_layers=tuple(name.strip() for name in args.layers.split(",") if name.strip()),
        task_limit=args.tasks,
        max_new_tokens=args.max_new_tokens,
        dual_max_new_tokens=args.dual_max_new_tokens,
    )
    loaded = loaded_model(args)
    s = run_steering(loaded, rows, opts, records_path=args.records)
    s["dual_channel_data"] = data.name
    lines = [
        f"steering ({s['direction']}) on {s['n_tasks']} code tasks, {s['model']}",
        f"  baseline {s['baseline_score']:.2f} (coherence {s['baseline_coherence']:.2f}), "
        f"text prompt {s['text_prompt_score']:.2f} (coherence {s['text_prompt_coherence']:.2f})",
        *(
            f"  alpha {r['alpha']:<5g} {r['layers']}: score {r['score']:.2f}, coherence {r['coherence']:.2f}"
            for r in s["sweep"]
        ),
        (
            f"  best at coherence >= {s['coherence_threshold']:g}: {best['layers']} alpha {best['alpha']:g}, "
            f"score {best['score']:.2f} (+{best['over_baseline']:.2f}), coherence {best['coherence']:.2f}, "
            f"tasks gained {best['gained']} / lost {best['lost']}, sign test p = {best['sign_test_p']:.3f}"
            if (best := s["best_coherent"])
            else f"  no sweep point reaches coherence {s['coherence_threshold']:g}"
        ),
        "  layers at alpha "
        + f"{s['layer_alpha']:g}: "
        + ", ".join(f"{k} {v:.2f} ({s['layer_coherence'][k]:.2f})" for k, v in s["layer_scores"].items()),
        f"  composition: cos {s['composition']['cos']:.3f}, a {s['composition']['score_a']:.2f}, "
        f"b {s['composition']['score_b']:.2f}, a+b {s['composition']['score_ab']}",
        *(
            f"  dual channel alpha {r['alpha']:<4g}: EM {r['em']:.3f}, F1 {r['f1']:.3f}, style {r['style_score']:.2f}"
            for r in s["dual_channel"]
        ),
    ]
    return _finish(args, s, "\n".join(lines))


def run_packet_cmd(args: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    rows = load_rows(args.data, args.limit)
    loaded = loaded_model(args)
    adapter_file = chosen_adapter(args.adapter, loaded)
    adapter = PacketAdapter.load(adapter_file, loaded.fingerprint) if adapter_file is not None else None
    opts = PacketEvalOptions(methods=methods, max_new_tokens=args.max_new_tokens, max_passages=args.max_passages)
    s = run_packet_eval(
        loaded,
        rows,
        adapter,
        opts,
        store=args.packets,
        records_path=args.records,
        data_name=args.data.name,
        adapter_name=str(adapter_file) if adapter_file else "",
    )
    lines = [f"packet eval on {s['n']} rows of {args.data.name}, {s['model']}"]
    for method, m in s["methods"].items():
        lines.append(
            f"  {method:<10} F1 {m['f1']:.3f}  EM {m['em']:.3f}  recomputed {m['recomputed_tokens']:.0f}  "
            f"TTFT {m['ttft_ms']:.0f} ms  GFLOP {m['flops'] / 1e9:.1f}"
        )
    return _finish(args, s, "\n".join(lines))


def run_routing_cmd(args: argparse.Namespace) -> int:
    if args.routing_only:
        model_options = [
            ("--model", args.model is not None),
            ("--device", args.device != "auto"),
            ("--dtype", args.dtype != "auto"),
            ("--max-new-tokens", args.max_new_tokens != DEFAULT_ROUTING_ANSWER_TOKENS),
        ]
        refuse_unused(model_options, "--routing-only loads no language model")
    chroma_location(args)
    rows = load_routing_rows(args.facts)
    name = "eval-" + "".join(c if c.isalnum() else "-" for c in args.facts.stem)[:40].strip("-")
    kb_dir = args.kb_dir or kvpack_home() / "kb-eval" / f"{name}-{len(rows)}"
    kb = KnowledgeBase(
        name, None if args.host else kb_dir, host=args.host, port=args.port, embedder=args.embedder, dims=args.dims
    )
    loaded = None if args.routing_only else loaded_model(args)  # routing alone needs no language model
    s = run_routing(
        loaded,
        rows,
        kb,
        limit=args.limit,
        k=args.k,
        probes=args.probes,
        lexical_weight=args.lexical_weight,
        max_new_tokens=args.max_new_tokens,
        answers=not args.routing_only,
        data_name=args.facts.name,
    )
    text = (
        f"routing on {s['n_facts']} facts in {s['n_banks']} banks ({s['n_questions']} questions, k={s['k']}, "
        f"probes={s['probes']}, {s['routing']}), {s['store']}\n"
        f"  routing accuracy {s['routing_accuracy']:.3f}"
        + (
            f", answer accuracy {s['answer_accuracy']:.3f} (oracle {s['oracle_answer_accuracy']:.3f})"
            if s["answer_accuracy"] is not None
            else ""
        )
        + f"\n  overhead p50 {s['p50_overhead_ms']:.1f} ms, p95 {s['p95_overhead_ms']:.1f} ms"
        + f" ({s['overhead_includes']})"
    )
    return _finish(args, s, text)
