"""Render the README's benchmark tables from the committed result JSON (no figure is typed by hand).

Usage: python benchmarks/report.py  (prints Markdown to stdout)
"""

from __future__ import annotations

import json
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def _machine(m: dict) -> str:
    return f"{m.get('cpu') or 'CPU'}, {m['cpu_count']} cores, torch {m['torch']}, transformers {m['transformers']}"


def equivalence(path: Path) -> str:
    s = json.loads(path.read_text())
    rows = [
        ("rows (all passages)", f"{s['n']} ({s['passages_per_row']:.0f} passages each)"),
        ("divergences (any differing generated token id)", f"**{s['divergences']}**"),
        ("EM kv / rag", f"{s['em_kv']:.3f} / {s['em_rag']:.3f}"),
        ("F1 kv / rag", f"{s['f1_kv']:.3f} / {s['f1_rag']:.3f}"),
        (
            "prompt tokens prefilled at query time, kv / rag (mean)",
            f"{s['prompt_tokens_kv']:.1f} / {s['prompt_tokens_rag']:.1f} (**{100 * s['prompt_token_ratio']:.1f}%**)",
        ),
        ("median TTFT kv / rag", f"{s['ttft_ms_kv']:.0f} ms / {s['ttft_ms_rag']:.0f} ms (**x{s['ttft_ratio']:.1f}**)"),
        ("pack size on disk (mean, fp32)", f"{s['pack_bytes_mean'] / 1e6:.1f} MB"),
    ]
    if "em_kv_raw" in s:
        rows.append(
            (
                "`--raw` (untemplated) KV: EM / F1",
                f"{s['em_kv_raw']:.3f} / {s['f1_kv_raw']:.3f} "
                f"(EM {s['em_raw_minus_kv']:+.3f}, F1 {s['f1_raw_minus_kv']:+.3f} vs templated KV; "
                f"differs from RAG on {s['raw_differs_from_rag']} rows)",
            )
        )
    head = (
        f"`kvpack eval equivalence` on `{s['data']}`, {s['model']} ({s['dtype']}); "
        f"{_machine(s['machine'])}; {s['elapsed_s'] / 60:.0f} min.\n\n"
    )
    return head + "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def accumulation(path: Path) -> str:
    s = json.loads(path.read_text())
    head = (
        f"`kvpack eval accumulation --steps {len(s['steps'])}` on `{s['data']}`, N = {s['n']}, {s['model']}; "
        f"{_machine(s['machine'])}; {s['elapsed_s'] / 60:.0f} min.\n\n"
    )
    lines = [
        "| step k | EM kv | EM rag | identical | tokens kv (query) | + new passage | tokens rag | savings "
        "| savings incl. new passage | TTFT kv incl. new passage / rag |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for st in s["steps"]:
        lines.append(
            f"| {st['k']} | {st['em_kv']:.3f} | {st['em_rag']:.3f} | {st['identical']}/{s['n']} "
            f"| {st['tokens_kv']:.1f} "
            f"| {st['build_tokens_kv']:.1f} | {st['tokens_rag']:.1f} | {100 * st['savings']:.1f}% "
            f"| {100 * st['savings_incl_build']:.1f}% | {st['ttft_ms_kv']:.0f} / {st['ttft_ms_rag']:.0f} ms |"
        )
    return head + "\n".join(lines)


def agent(path: Path) -> str:
    s = json.loads(path.read_text())
    c = s["config"]
    head = (
        f"`python benchmarks/langchain_agent.py` on `{c['data']}`, N = {s['rows']}, {c['steps']} steps "
        f"({c['steps'] - 1} forced retrievals of k = {c['k']}, then the answer), {s['model']}; "
        f"{_machine(s['machine'])}.\n\n"
    )
    rows = [
        (
            "prompt tokens prefilled, KVPackChatModel / ChatHuggingFace",
            f"{s['kv_prefilled_tokens']:,} / {s['text_prefilled_tokens']:,} "
            f"(**{100 * s['prefill_reduction']:.1f}% fewer**)",
        ),
        (
            "... counting the one-time pack build too",
            f"{s['kv_prefilled_tokens'] + s['pack_build_tokens']:,} "
            f"({100 * s['prefill_reduction_incl_pack_build']:.1f}% fewer)",
        ),
        (
            "model time, KVPackChatModel / ChatHuggingFace",
            f"{s['kv_model_s']:.0f} s / {s['text_model_s']:.0f} s (**x{s['model_time_ratio']:.1f}**)",
        ),
        ("whole agent wall time, KV arm (tools, retrieval, LangGraph included)", f"{s['kv_agent_wall_s']:.0f} s"),
        ("final answers identical (greedy)", f"**{s['answers_identical']}/{s['rows']}**"),
        ("replayed prompts token-identical to ours (every step)", f"{s['prompts_identical']}/{s['rows']}"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    steps = [
        "| step | prefilled KV | from cache KV | prefilled text | model ms KV / text |",
        "|---|---|---|---|---|",
    ]
    for st in s["per_step"]:
        steps.append(
            f"| {st['step']} | {st['kv_prefilled_mean']:.0f} | {st['kv_cached_mean']:.0f} "
            f"| {st['text_prefilled_mean']:.0f} | {st['kv_model_ms_mean']:.0f} / {st['text_model_ms_mean']:.0f} |"
        )
    return head + table + "\n\nPer step (means over the questions):\n\n" + "\n".join(steps)


def routing(paths: list[Path]) -> str:
    """One table over every `kvpack eval routing` result."""
    lines = [
        "| facts file | store | routing | dims | facts / banks | questions | k / probes | routing acc. "
        "| answer acc. (oracle) | bytes / fact | route p50 | overhead p50 / p95 | build facts/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    machine = ""
    for path in paths:
        s = json.loads(path.read_text())
        machine = _machine(s["machine"])
        store = "server" if ":" in s["store"] and not s["store"].startswith("/") else "embedded"
        answers = (
            f"{s['answer_accuracy']:.3f} ({s['oracle_answer_accuracy']:.3f})"
            if s["answer_accuracy"] is not None
            else "-"
        )
        size = f"{s['bytes_per_fact']:,.0f}" if s["bytes_per_fact"] else "- (server)"
        build = f"{s['build_facts_per_s']:.0f}" if s["build_facts_per_s"] else "(reused)"
        overhead = f"{s['p50_overhead_ms']:.0f} / {s['p95_overhead_ms']:.0f} ms"
        if s["answer_accuracy"] is None:
            overhead = "- (no KV build)"
        mode = "hybrid" if s["lexical_weight"] else "dense"
        lines.append(
            f"| `{s['data']}` | {store} | {mode} | {s['routing_dim']} | {s['n_facts']:,} / {s['n_banks']:,} "
            f"| {s['n_questions']} | {s['k']} / {s['probes']} | **{s['routing_accuracy']:.3f}** | {answers} | {size} "
            f"| {s['p50_route_ms']:.0f} ms | {overhead} | {build} |"
        )
    return f"`kvpack eval routing`, all-MiniLM-L6-v2 embeddings, SmolLM2-135M-Instruct; {machine}.\n\n" + "\n".join(
        lines
    )


def steering(path: Path) -> str:
    """The steering tables: sweep, layer thirds, composition, dual channel."""
    s = json.loads(path.read_text())
    head = (
        f"`kvpack eval steering`, {s['model']}, {s['n_tasks']} code tasks, direction `{s['direction']}` "
        f"({s['n_pairs']['defensive']} pairs); {_machine(s['machine'])}.\n\n"
    )
    sweep = ["| arm | alpha | layers | score | coherence |", "|---|---|---|---|---|"]
    sweep.append(f"| baseline | 0 | - | {s['baseline_score']:.3f} | {s['baseline_coherence']:.3f} |")
    sweep.append(f"| text prompt | - | - | {s['text_prompt_score']:.3f} | {s['text_prompt_coherence']:.3f} |")
    for r in s["sweep"]:
        sweep.append(f"| steered | {r['alpha']:g} | {r['layers']} | {r['score']:.3f} | {r['coherence']:.3f} |")
    for name, score in s["layer_scores"].items():
        layers = s["layers"][name]
        sweep.append(
            f"| layer third | {s['layer_alpha']:g} | {name} ({layers[0]}-{layers[-1]}) | {score:.3f} "
            f"| {s['layer_coherence'][name]:.3f} |"
        )
    best, threshold = s["best_coherent"], s["coherence_threshold"]
    verdict = (
        f"\n\nBest point at coherence >= {threshold:g}: {best['layers']} layers, alpha {best['alpha']:g}, score "
        f"{best['score']:.3f} against the baseline's {s['baseline_score']:.3f} (+{best['over_baseline']:.3f}), "
        f"coherence {best['coherence']:.3f}; per task {best['gained']} gained and {best['lost']} lost the pattern, "
        f"paired sign test p = {best['sign_test_p']:.3f}."
        if best
        else f"\n\nNo sweep point reaches coherence {threshold:g}."
    )
    c = s["composition"]
    comp = (
        f"\n\nComposition at alpha {c['alpha']:g} ({c['layers']} layers): "
        f"cos(defensive, docstrings) = {c['cos']:.3f}; "
        f"defensive alone {c['score_a']:.2f}, docstrings alone {c['score_b']:.2f} (baseline {c['baseline_b']:.2f}); "
        f"sum: defensive {c['score_ab']['defensive']:.2f}, docstrings {c['score_ab']['docstrings']:.2f}, "
        f"coherence {c['coherence_ab']:.3f}."
    )
    dual = [
        f"\n\nDual channel ({s['dual_channel_rows']} rows of `{s.get('dual_channel_data', 'hotpotqa_dev_300.jsonl')}`, "
        "gold passages as knowledge, `formal` on the mid layers):\n",
        "| alpha | EM | F1 | formal style |",
        "|---|---|---|---|",
    ]
    dual += [f"| {r['alpha']:g} | {r['em']:.3f} | {r['f1']:.3f} | {r['style_score']:.2f} |" for r in s["dual_channel"]]
    return head + "\n".join(sweep) + verdict + comp + "\n".join(dual)


def packet(paths: list[Path]) -> str:
    """One table per dataset (every method, mixture adapter), then the cross-domain rows (packet only)."""
    runs = {p.stem.removeprefix("packet_"): json.loads(p.read_text()) for p in paths}
    main = {k: v for k, v in runs.items() if "rerotated" in v["methods"]}  # the runs of every baseline
    out = []
    for s in main.values():
        full = s["methods"]["full"]
        out.append(
            f"`kvpack eval packet` on `{s['data']}`, N = {s['n']}, every passage a document, {s['model']}, "
            f"adapter `{Path(s['methods']['packet']['adapter']).name}`; {_machine(s['machine'])}.\n"
        )
        out.append(
            "| method | F1 | EM | F1 / full (95% CI) | agreement with full: F1, identical | recomputed doc tokens "
            "| GFLOP (est.) | median TTFT | full / method |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        for method, m in s["methods"].items():
            agreement = f"{m['agreement_f1']:.2f}, {m['same_as_full']:.0%}" if "agreement_f1" in m else "-"
            ci = m.get("f1_vs_full_ci95")
            ratio = f"{m['f1'] / full['f1']:.0%}" + (f" ({ci[0]:.0%}-{ci[1]:.0%})" if ci and method != "full" else "")
            out.append(
                f"| {method} | {m['f1']:.3f} | {m['em']:.3f} | {ratio} | {agreement} | "
                f"{m['recomputed_tokens']:.0f} | {m['flops'] / 1e9:.1f} | {m['ttft_ms']:.0f} ms | "
                f"x{full['ttft_ms'] / m['ttft_ms']:.1f} |"
            )
        out.append("")
    cross = {k: v for k, v in runs.items() if "full" not in v["methods"]}
    if cross:
        out.append("Adapter trained on HotpotQA only vs the mixture, packet method:\n")
        out.append("| data | adapter | F1 | EM | F1 / full (same data) |")
        out.append("|---|---|---|---|---|")
        for name, s in cross.items():
            base = main.get(name.split("_hotpotqa_adapter")[0])
            m = s["methods"]["packet"]
            ratio = f"{m['f1'] / base['methods']['full']['f1']:.0%}" if base else "-"
            if base:
                mix = base["methods"]["packet"]
                mix_ratio = mix["f1"] / base["methods"]["full"]["f1"]
                out.append(f"| `{s['data']}` | mixture | {mix['f1']:.3f} | {mix['em']:.3f} | {mix_ratio:.0%} |")
            adapter = Path(m["adapter"]).name
            out.append(f"| `{s['data']}` | {adapter} | {m['f1']:.3f} | {m['em']:.3f} | {ratio} |")
    return "\n".join(out)


@cache  # the sort keys and the table rows all ask: each file is opened once
def _adapter_file(adapter: Path) -> tuple[dict[str, str], str]:
    """The adapter file's safetensors metadata and its header + trailer soft tokens ({} and "?" when the
    file is not here)."""
    from safetensors import safe_open

    if not adapter.is_file():
        return {}, "?"
    with safe_open(str(adapter), framework="pt") as fh:
        tokens = f"{fh.get_slice('header').get_shape()[0]} + {fh.get_slice('trailer').get_shape()[0]}"
        return fh.metadata() or {}, tokens


def _trained_steps(adapter: Path) -> str:
    """Optimizer steps behind an adapter, those of the adapter it was fine-tuned from included."""
    return _adapter_file(adapter)[0].get("trained_steps", "?")


def _soft_tokens(adapter: Path) -> str:
    """Header + trailer soft tokens: the first dimension of the two tensors in the file."""
    return _adapter_file(adapter)[1]


def _by_training(adapter: str) -> tuple[int, str]:
    """Sort key: plain caches first, then adapters by how long they were trained."""
    if adapter == "none":
        return (-1, adapter)
    steps = _trained_steps(Path(adapter))
    return (int(steps) if steps.isdigit() else 1 << 30, Path(adapter).stem)


def _run_order(run: dict[str, Any]) -> tuple[str, tuple[int, str], int]:
    """Sort key: by dataset, then adapters by training, then a run over more rows after a shorter one."""
    return (run["data"], _by_training(run["methods"]["packet"]["adapter"]), run["n"])


def packet_adapters(paths: list[Path]) -> str:
    """Packet against full recompute per adapter, one row per (data, adapter) run that includes full."""
    runs = [json.loads(p.read_text()) for p in paths]
    out = [
        "| data | N | adapter (trained steps, soft tokens) | packet F1 | full F1 | F1 / full (95% CI) "
        "| agreement with full: F1, identical | median TTFT full / packet |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with_full = (r for r in runs if "full" in r["methods"])
    for s in sorted(with_full, key=_run_order):
        full, m = s["methods"]["full"], s["methods"]["packet"]
        adapter = Path(m["adapter"])
        steps = _trained_steps(adapter)
        ci = m["f1_vs_full_ci95"]
        out.append(
            f"| `{s['data']}` | {s['n']} | `{adapter.stem}` ({steps}, {_soft_tokens(adapter)}) "
            f"| {m['f1']:.3f} | {full['f1']:.3f} | "
            f"{m['f1'] / full['f1']:.0%} ({ci[0]:.0%}-{ci[1]:.0%}) | "
            f"{m['agreement_f1']:.2f}, {m['same_as_full']:.0%} | "
            f"{full['ttft_ms']:.0f} / {m['ttft_ms']:.0f} ms (x{full['ttft_ms'] / m['ttft_ms']:.1f}) |"
        )
    return "\n".join(out)


def _f1_ratio(f1: dict[tuple[str, int], float], rows: range) -> float:
    """Packet's F1 over full recompute's, summed over the rows (the harness's F1 / full)."""
    return sum(f1["packet", i] for i in rows) / sum(f1["full", i] for i in rows)


def packet_whole_sets(paths: list[Path]) -> str:
    """Runs continued over a whole dev set (`*_all`): per-row comparisons the run's JSON does not hold.

    The first 100 rows were copied from the 100-row run, so the ratio is also split there.
    """
    out = [
        "| data | N | adapter | rows with full F1 > 0 | packet above / below full (rows) "
        "| F1 / full, rows 1-100 / the rest |",
        "|---|---|---|---|---|---|",
    ]
    for path in paths:
        run = json.loads(path.read_text())
        f1 = {(r["method"], r["row"]): r["f1"] for r in _records(path)}
        rows = range(run["n"])

        above = sum(f1["packet", i] > f1["full", i] for i in rows)
        below = sum(f1["packet", i] < f1["full", i] for i in rows)
        out.append(
            f"| `{run['data']}` | {run['n']} | `{Path(run['methods']['packet']['adapter']).stem}` "
            f"| {sum(f1['full', i] > 0 for i in rows)} | {above} / {below} "
            f"| {_f1_ratio(f1, rows[:100]):.0%} / {_f1_ratio(f1, rows[100:]):.0%} |"
        )
    return "\n".join(out)


def _records(run_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in run_path.with_suffix(".records.jsonl").read_text().splitlines()]


def packet_pooled(paths: list[Path]) -> str:
    """Each adapter's whole-dev-set runs pooled: sum of packet F1 over sum of full F1 across every row of
    every dataset, with a paired bootstrap interval (rows of all datasets resampled together). The sums
    weigh a dataset by its full-recompute F1, so the plain mean of the datasets' ratios stands beside it."""
    from kvpack_integrations.evaluation.bootstrap import ratio_interval

    by_adapter: dict[str, list[tuple[Path, dict[str, Any]]]] = defaultdict(list)
    for path in paths:
        run = json.loads(path.read_text())
        by_adapter[run["methods"]["packet"]["adapter"]].append((path, run))
    out = [
        "| adapter | N (datasets) | packet F1 | full F1 | F1 / full, pooled (95% CI) | mean of the datasets' ratios |",
        "|---|---|---|---|---|---|",
    ]
    for adapter in sorted(by_adapter, key=_by_training):
        packet_f1: list[float] = []
        full_f1: list[float] = []
        ratios = []
        for path, run in by_adapter[adapter]:
            f1 = {(r["method"], r["row"]): r["f1"] for r in _records(path)}
            rows = range(run["n"])
            missing = [i for i in rows if ("packet", i) not in f1 or ("full", i) not in f1]
            if missing or not sum(f1["full", i] for i in rows):
                raise SystemExit(f"{path.name}: rows {missing[:5]} lack a record, or full recompute's F1 sums to 0")
            packet_f1 += [f1["packet", i] for i in rows]
            full_f1 += [f1["full", i] for i in rows]
            ratios.append(_f1_ratio(f1, rows))
        ci = ratio_interval(packet_f1, full_f1)
        interval = f" ({ci[0]:.0%}-{ci[1]:.0%})" if ci else ""
        out.append(
            f"| `{Path(adapter).stem}` | {len(full_f1)} ({len(ratios)}) "
            f"| {sum(packet_f1) / len(packet_f1):.3f} | {sum(full_f1) / len(full_f1):.3f} "
            f"| {sum(packet_f1) / sum(full_f1):.0%}{interval} | {sum(ratios) / len(ratios):.0%} |"
        )
    return "\n".join(out)


def _shipped_adapter_stem() -> str:
    """The benchmark adapter whose soft tokens the package ships as the default model's adapter (by the
    tokens' digest, not the file's bytes: re-stamping a fingerprint rewrites the metadata only)."""
    from kvpack_integrations.packet.adapter import PacketAdapter

    def digest(path: Path) -> str:
        return PacketAdapter.load(path).digest()

    package = Path(__file__).parents[1] / "kvpack_integrations" / "packet" / "adapters"
    shipped = {digest(f) for f in package.glob("*.safetensors")}
    for adapter in sorted((Path(__file__).parent / "adapters").glob("*.safetensors")):
        if digest(adapter) in shipped:
            return adapter.stem
    raise SystemExit("no adapter under benchmarks/adapters is the one the package ships")


def _ratio_cell(f1: list[float], reference: list[float]) -> str:
    """sum(f1) / sum(reference) with its paired bootstrap interval."""
    from kvpack_integrations.evaluation.bootstrap import ratio_interval

    ci = ratio_interval(f1, reference)
    return f"{sum(f1) / sum(reference):.0%}" + (f" ({ci[0]:.0%}-{ci[1]:.0%})" if ci else "")


def _agreement_cell(answers: list[str], reference: list[str]) -> str:
    """Mean token F1 between each answer and the reference answer, and the share identical."""
    from kvpack_integrations.evaluation.metrics import text_f1

    agree = sum(text_f1(a, r) for a, r in zip(answers, reference, strict=True)) / len(answers)
    same = sum(a == r for a, r in zip(answers, reference, strict=True)) / len(answers)
    return f"{agree:.2f}, {same:.0%}"


def packet_precision(paths: list[Path], whole: list[Path]) -> str:
    """Full recompute in bfloat16 judged like packet: its F1 over fp32 full recompute's (the reference of
    the whole-set runs, same rows) and its agreement with fp32's answers, beside the shipped packet adapter
    on the same rows. Rounding changes nothing in the method, so its ratio shows how finely this F1 can
    tell a method from full recompute on this model."""
    shipped = _shipped_adapter_stem()
    reference = {}
    for path in whole:
        run = json.loads(path.read_text())
        if Path(run["methods"]["packet"]["adapter"]).stem == shipped:
            reference[run["data"]] = {(r["method"], r["row"]): r for r in _records(path)}
    out = [
        "| data | N | bf16 full F1 | fp32 full F1 | bf16 / fp32 (95% CI) | bf16 agreement with fp32: F1, identical "
        f"| packet (`{shipped}`) / fp32 (95% CI) | packet agreement: F1, identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pooled: dict[str, list[float]] = defaultdict(list)
    for path in paths:
        run = json.loads(path.read_text())
        ref, rows = reference.get(run["data"], {}), range(run["n"])
        by_method = {"bf16": {r["row"]: r for r in _records(path)}}
        by_method |= {m: {i: ref[m, i] for i in rows if (m, i) in ref} for m in ("full", "packet")}
        if any(len(records) < run["n"] for records in by_method.values()):
            raise SystemExit(f"{path.name}: rows lack a bf16 record or a `{shipped}` whole-set record to compare")
        f1 = {m: [records[i]["f1"] for i in rows] for m, records in by_method.items()}
        answers = {m: [records[i]["answer"] for i in rows] for m, records in by_method.items()}
        out.append(
            f"| `{run['data']}` | {run['n']} | {sum(f1['bf16']) / run['n']:.3f} | {sum(f1['full']) / run['n']:.3f} "
            f"| {_ratio_cell(f1['bf16'], f1['full'])} | {_agreement_cell(answers['bf16'], answers['full'])} "
            f"| {_ratio_cell(f1['packet'], f1['full'])} | {_agreement_cell(answers['packet'], answers['full'])} |"
        )
        for m, values in f1.items():
            pooled[m] += values
    if len(paths) > 1:
        n = len(pooled["full"])
        out.append(
            f"| pooled ({len(paths)} datasets) | {n} | {sum(pooled['bf16']) / n:.3f} | {sum(pooled['full']) / n:.3f} "
            f"| {_ratio_cell(pooled['bf16'], pooled['full'])} | - "
            f"| {_ratio_cell(pooled['packet'], pooled['full'])} | - |"
        )
    return "\n".join(out)


def packet_divergence(paths: list[Path]) -> str:
    """Held-out KL per adapter (rows) and dataset (columns)."""
    runs = [json.loads(p.read_text()) for p in paths]
    datasets = sorted({r["data"] for r in runs})
    paths_of = {Path(r["adapter"]).stem: r["adapter"] for r in runs}
    adapters = sorted(paths_of, key=lambda a: _by_training(paths_of[a]))
    kl = {(Path(r["adapter"]).stem, r["data"]): r for r in runs}
    out = [
        "| caches | soft tokens | trained steps | "
        + " | ".join(f"`{d}` ({kl[adapters[0], d]['n']} rows)" for d in datasets)
        + " |"
    ]
    out.append("|---" * (len(datasets) + 3) + "|")
    for a in adapters:
        if a == "none":
            name, tokens, steps = "plain (no adapter)", "0", "0"
        else:
            name, tokens, steps = f"`{a}`", _soft_tokens(Path(paths_of[a])), _trained_steps(Path(paths_of[a]))
        out.append(
            f"| {name} | {tokens} | {steps} | "
            + " | ".join(f"{kl[a, d]['kl']:.3f}" if (a, d) in kl else "-" for d in datasets)
            + " |"
        )
    return "\n".join(out)


def gpu_packet(path: Path) -> str:
    """Median TTFT per method and prompt shape on the GPU, and full / method (one run)."""
    run = json.loads(path.read_text())
    methods = list(run["shapes"][0]["ttft_ms"])
    m = run["machine"]
    head = (
        f"{run['model']}, {run['dtype']}; {m['cuda']}, torch {m['torch']}, transformers {m['transformers']}; "
        f"median of {run['repeats']} runs.\n\n"
    )
    out = ["| documents x tokens | prompt tokens | " + " | ".join(f"`{x}`" for x in methods) + " | packet load |"]
    out.append("|---" * (len(methods) + 3) + "|")
    for shape in run["shapes"]:
        ttft, ratio = shape["ttft_ms"], shape["full_over_method"]
        cells = [f"{ttft[x]:.0f} ms" + ("" if x == "full" else f" (x{ratio[x]:.2f})") for x in methods]
        out.append(
            f"| {shape['documents']} x {shape['tokens_per_document']} | {shape['prompt_tokens']} | "
            + " | ".join(cells)
            + f" | {shape['packet_load_ms']:.0f} ms |"
        )
    return head + "\n".join(out)


def llama_index(path: Path) -> str:
    """The stock text `RetrieverQueryEngine` against `KVPackQueryEngine`, one row per figure."""
    s = json.loads(path.read_text())
    c = s["config"]
    rows = [
        ("questions", f"{s['rows']} (`{c['data']}`, top {c['top_k']} passages, {c['max_new_tokens']} new tokens)"),
        ("answers identical (greedy, exact mode)", f"**{s['answers_identical']} / {s['rows']}**"),
        ("prompt tokens per query (mean)", f"{s['prompt_tokens_mean']:.0f}"),
        (
            "prefilled tokens per query, KV / text (mean)",
            f"{s['prefilled_per_query_kv_mean']:.1f} / {s['prefilled_per_query_text_mean']:.1f} "
            f"(**{s['prefill_reduction']:.1%} fewer**)",
        ),
        (
            "median TTFT, KV / text",
            f"{s['ttft_ms_kv_median']:.0f} ms / {s['ttft_ms_text_median']:.0f} ms "
            f"(**x{s['ttft_ratio_text_over_kv']:.1f}**)",
        ),
        (
            "median `query()` wall time, KV / text (retrieval and decoding included)",
            f"{s['query_wall_ms_kv_median']:.0f} ms / {s['query_wall_ms_text_median']:.0f} ms",
        ),
        ("F1 KV / text", f"{s['f1_kv_mean']:.3f} / {s['f1_text_mean']:.3f}"),
    ]
    head = f"{s['model']}; {_machine(s['machine'])}.\n\n| | |\n|---|---|\n"
    return head + "\n".join(f"| {k} | {v} |" for k, v in rows)


if __name__ == "__main__":
    for name, fn in (
        ("equivalence_hotpotqa_dev.json", equivalence),
        ("accumulation_hotpotqa_dev.json", accumulation),
        ("langchain_agent_musique_dev.json", agent),
        ("llama_index_query_engine.json", llama_index),
    ):
        path = RESULTS / name
        if path.is_file():
            print(fn(path) + "\n")
    if (RESULTS / "steering_smollm2.json").is_file():
        print(steering(RESULTS / "steering_smollm2.json") + "\n")
    found = sorted(RESULTS.glob("routing_*.json"))
    if found:
        print(routing(found) + "\n")
    found = [p for p in sorted(RESULTS.glob("packet_*.json")) if "methods" in json.loads(p.read_text())]
    found += sorted(RESULTS.glob("packet_divergence_*.json"))
    found = sorted(set(found))
    divergence = [p for p in found if p.stem.startswith("packet_divergence_")]
    precision = [p for p in found if p.stem.endswith("_full_bf16")]
    evals = [p for p in found if p not in divergence and p not in precision]
    if evals:
        print(packet(evals) + "\n")
        print(packet_adapters(evals) + "\n")
    whole = [p for p in evals if p.stem.endswith("_all")]
    if whole:
        print(packet_whole_sets(whole) + "\n")
        print(packet_pooled(whole) + "\n")
    if precision and whole:
        print(packet_precision(precision, whole) + "\n")
    if divergence:
        print(packet_divergence(divergence) + "\n")
    for path in sorted(RESULTS.glob("gpu_packet_ttft_*.json")):
        print(f"{path.name}:\n\n" + gpu_packet(path) + "\n")
