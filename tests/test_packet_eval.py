"""Selective recompute and the `kvpack eval packet` harness on tiny models."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from kvpack_integrations.composition.cache_ops import empty_cache, forward
from kvpack_integrations.composition.rope import rope_spec
from kvpack_integrations.errors import CompositionError, InvalidInputError
from kvpack_integrations.evaluation.datasets import Passage, QARow
from kvpack_integrations.evaluation.metrics import text_f1
from kvpack_integrations.evaluation.packet_eval import METHODS, PacketEvalOptions, run_packet_eval
from kvpack_integrations.packet import PacketAdapter
from kvpack_integrations.packet.compose import cache_packet, compose_packets
from kvpack_integrations.packet.layout import packet_prompt
from kvpack_integrations.packet.recompute import recompute_positions, value_deviation
from kvpack_integrations.prompts.knowledge import KnowledgeFormat

from .conftest import FACTS, QUESTION
from .support.tiny_models import make_model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_recomputing_every_document_token_gives_the_full_prefill(family: str) -> None:
    loaded = make_model(family)
    prompt = packet_prompt(loaded.tokenizer, FACTS[:3], QUESTION, KnowledgeFormat())
    ids = [*prompt.preamble, *(t for d in prompt.documents for t in d)]
    preamble = empty_cache(loaded)
    forward(loaded, preamble, prompt.preamble)
    cache = compose_packets(
        loaded, preamble, [cache_packet(loaded, None, d) for d in prompt.documents], rope_spec(loaded)
    )
    deviation = value_deviation(loaded, cache, ids)
    assert torch.all(deviation[: len(prompt.preamble)] < 1e-4)  # the preamble is exact
    assert deviation[len(prompt.preamble) :].max() > 1e-3  # documents cached alone are not
    full = empty_cache(loaded)
    want = forward(loaded, full, ids + list(prompt.tail))
    recompute_positions(loaded, cache, ids, range(len(prompt.preamble), len(ids)))
    assert torch.all(value_deviation(loaded, cache, ids) < 1e-4)
    got = forward(loaded, cache, prompt.tail)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(CompositionError, match="outside"):
        recompute_positions(loaded, cache, ids, [10_000])


def test_blend_selection_leaves_other_threads_forwards_alone() -> None:
    """`layer_values` stops the model after layer 1 with a hook on the shared model; a request decoding
    on another thread at the same time must neither be stopped nor have its values captured."""
    import threading

    from kvpack_integrations.packet.recompute import layer_values

    loaded = make_model("llama")
    ids = loaded.tokenizer(FACTS[0], add_special_tokens=False)["input_ids"]
    want = layer_values(loaded, ids)
    other = torch.tensor([[ids[0]]])
    errors: list[str] = []
    done = threading.Event()

    def decoding() -> None:
        while not done.is_set():
            try:
                with torch.no_grad():
                    loaded.model(input_ids=other, use_cache=False)
            except Exception as exc:
                errors.append(type(exc).__name__)

    thread = threading.Thread(target=decoding)
    thread.start()
    try:
        for _ in range(60):
            torch.testing.assert_close(layer_values(loaded, ids), want)
    finally:
        done.set()
        thread.join()
    assert errors == []


def _rows() -> list[QARow]:
    return [
        QARow(QUESTION, ("Quill Energy",), tuple(Passage(f"T{i}", f, i == 2) for i, f in enumerate(FACTS[:4]))),
        QARow("How long does the Aurora X2 fly?", ("48 minutes",), tuple(Passage("A", f, True) for f in FACTS[1:3])),
    ]


def test_every_method_in_one_harness(tmp_path) -> None:
    loaded = make_model("llama")
    adapter = PacketAdapter.initial(loaded, 2, 2)
    records = tmp_path / "r.jsonl"
    s = run_packet_eval(
        loaded,
        _rows(),
        adapter,
        PacketEvalOptions(max_new_tokens=4, epic_tokens=3),
        records_path=records,
        progress=False,
    )
    m = s["methods"]
    assert list(m) == list(METHODS) and s["n"] == 2
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 2 * len(METHODS)
    doc_tokens = {r["row"]: r["document_tokens"] for r in rows}
    assert m["full"]["recomputed_tokens"] == sum(doc_tokens.values()) / 2
    assert (
        m["packet"]["recomputed_tokens"] == m["rerotated"]["recomputed_tokens"] == m["naive"]["recomputed_tokens"] == 0
    )
    assert m["epic"]["recomputed_tokens"] == (len(FACTS[:4]) * 3 + 2 * 3) / 2  # 3 tokens of each document
    assert 0 < m["blend"]["recomputed_tokens"] < 0.3 * m["full"]["recomputed_tokens"]
    # (on a 2-layer model, blend's two-layer pass costs a full forward: no ordering between full and blend)
    assert (
        m["full"]["flops"] > m["packet"]["flops"] > 0
        and m["blend"]["flops"] > m["epic"]["flops"] > m["packet"]["flops"]
    )
    assert not m["full"]["approximate"] and all(m[k]["approximate"] for k in METHODS if k != "full")
    assert m["full"]["f1_vs_full"] in (1.0, None) and m["packet"]["adapter"] == ""
    assert m["full"]["agreement_f1"] == m["full"]["same_as_full"] == 1.0
    assert m["full"]["f1_vs_full_ci95"] in ([1.0, 1.0], None)  # None: full scored 0 on every row
    by_row = {(r["row"], r["method"]): r["answer"] for r in rows}
    naive_same = sum(by_row[(i, "naive")] == by_row[(i, "full")] for i in range(2)) / 2
    assert m["naive"]["same_as_full"] == naive_same and 0 <= m["naive"]["agreement_f1"] <= 1
    with pytest.raises(InvalidInputError, match="unknown methods"):
        run_packet_eval(loaded, _rows(), adapter, PacketEvalOptions(methods=("magic",)), progress=False)
    with pytest.raises(InvalidInputError, match="no adapter"):
        run_packet_eval(loaded, _rows(), None, PacketEvalOptions(methods=("packet",)), progress=False)


def test_an_interrupted_eval_resumes_from_its_records(tmp_path) -> None:
    loaded = make_model("llama")
    records = tmp_path / "r.jsonl"
    opts = PacketEvalOptions(methods=("full", "rerotated"), max_new_tokens=3)
    run_packet_eval(loaded, _rows()[:1], None, opts, records_path=records, progress=False)
    first = records.read_text()
    s = run_packet_eval(loaded, _rows(), None, opts, records_path=records, progress=False)
    lines = records.read_text().splitlines()
    assert records.read_text().startswith(first) and len(lines) == 4  # row 0 kept, only row 1 computed
    assert s["n"] == 2 and s["methods"]["full"]["f1_vs_full"] in (1.0, None)
    other = [QARow("Another question?", ("x",), _rows()[0].passages)]
    with pytest.raises(InvalidInputError, match="records of other data"):
        run_packet_eval(loaded, other, None, opts, records_path=records, progress=False)
    edited = [replace(_rows()[0], passages=_rows()[0].passages[:2])]  # the same question, other passages
    with pytest.raises(InvalidInputError, match="records of other data"):
        run_packet_eval(loaded, edited, None, opts, records_path=records, progress=False)
    longer = PacketEvalOptions(methods=("full", "rerotated"), max_new_tokens=4)
    longer_run = run_packet_eval(loaded, _rows(), None, longer, records_path=records, progress=False)
    assert longer_run["records_set_aside"] == 4 and len(records.read_text().splitlines()) == 8  # all redone, none lost
    back = run_packet_eval(loaded, _rows(), None, opts, records_path=records, progress=False)
    assert back["records_set_aside"] == 0 and back["methods"] == s["methods"]  # the first settings' records reused
    assert len(records.read_text().splitlines()) == 8  # nothing redone: each setting's records were kept
    # a run killed mid-write leaves half a line: that row is redone, the file stays readable
    records.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    again = run_packet_eval(loaded, _rows(), None, opts, records_path=records, progress=False)
    assert again["methods"]["full"]["f1"] == s["methods"]["full"]["f1"]  # greedy: the redone row is the same
    text = records.read_text().splitlines()
    assert text[3] == lines[3][:25] and len(text) == 5  # the half line stays alone; one record redone
    redone = json.loads(text[4])
    assert (redone["row"], redone["method"]) == (json.loads(lines[3])["row"], json.loads(lines[3])["method"])
    with pytest.raises(InvalidInputError, match="no rows"):
        run_packet_eval(loaded, [], None, opts, progress=False)
    with pytest.raises(InvalidInputError, match="max_passages must be >= 1, got 3 and 0"):
        run_packet_eval(loaded, _rows(), None, replace(opts, max_passages=0), progress=False)


def test_agreement_f1_compares_whole_answers() -> None:
    assert text_f1("The band formed in New York.", "the band formed in new york") == 1.0
    assert text_f1("", "") == 1.0 and text_f1("Paris", "") == 0.0 and text_f1("x y", "z") == 0.0
    assert text_f1("Paris is big\nmore", "Paris is small") == 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)


def test_gpu_timing_script_runs_on_a_tiny_model(tmp_path) -> None:
    """`benchmarks/gpu_packet_ttft.py --tiny`: the GPU benchmark's code path, checked where CI runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_packet_ttft.py"
    out = tmp_path / "gpu.json"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary)}
    args = [sys.executable, str(script), "--tiny", "--out", str(out), "--shapes", "3x12", "--repeats", "1"]
    subprocess.run(args, check=True, capture_output=True, timeout=300, env=env)
    assert not list(temporary.iterdir())  # its packet store went with it
    first = json.loads(out.read_text())["shapes"]
    # an interrupted run resumes: measured shapes are kept as they were, only the new one is timed
    more = [*args[:-3], "2x8,3x12", "--repeats", "1"]
    subprocess.run(more, check=True, capture_output=True, timeout=300, env=env)
    shapes = json.loads(out.read_text())["shapes"]
    assert shapes[0] == first[0] and [(r["documents"], r["tokens_per_document"]) for r in shapes] == [(3, 12), (2, 8)]
    other = subprocess.run([*args[:-1], "2"], capture_output=True, text=True, timeout=300, env=env)
    assert other.returncode != 0 and "holds results of another configuration (repeats)" in other.stderr
    shape = shapes[0]
    assert shape["prompt_tokens"] > shape["tail_tokens"] + 36  # preamble + 3 documents of 12 tokens + tail
    assert set(shape["ttft_ms"]) == {"full", "packet", "rerotated", "blend", "epic", "packet_resident", "packet_host"}
    assert shape["recomputed_tokens"]["packet"] == 0 and shape["recomputed_tokens"]["full"] == 36
    assert shape["resident_packets"] == 3 and shape["resident_hits"] == 3  # the timed run never read the store
    assert shape["host_packets"] == 3 and shape["host_hits"] == 3 and shape["host_bytes"] > 0  # nor the host tier
    ways = {"store", "store_1_threads", "store_4_threads", "store_16_threads", "mapped_previous_store", "read_whole"}
    ways |= {"safetensors_to_device"}
    assert set(shape["load_variants_ms"]) == ways


def test_squad_scoring() -> None:
    """SQuAD v1.1 normalisation (lower case, ASCII punctuation and articles dropped), the first line of
    the answer, the best of several gold answers."""
    from kvpack_integrations.evaluation.metrics import answer_span, exact_match, f1_score, normalize

    assert normalize("The  Band, of New-York!") == "band of newyork"
    assert answer_span("\n  Paris.\nIt is in France.") == "Paris."
    assert exact_match("The Paris.\nmore text", ["paris"]) == 1.0 and exact_match("Paris, France", ["Paris"]) == 0.0
    assert f1_score("Paris France", ["Paris"]) == 2 * (1 / 2) * 1 / (1 / 2 + 1)
    assert f1_score("New York City", ["Boston", "new york"]) == 2 * (2 / 3) * 1 / (2 / 3 + 1)  # the best gold
    assert f1_score("", ["Paris"]) == 0.0 and f1_score("London", ["Paris"]) == 0.0


def test_every_method_starts_from_the_same_store_state(tmp_path, monkeypatch) -> None:
    """Each method reads its own packet files just before its timing (methods share the plain ones, so
    otherwise the first to run pays the disk for the rest), and a packet built inside the timing is an
    error; records that do not say their settings are redone on resume."""
    from kvpack_integrations.evaluation.packet_eval import PacketHarness
    from kvpack_integrations.packet.composer import PacketComposer

    loaded = make_model("llama")
    adapter = PacketAdapter.initial(loaded, 2, 2)
    opts = PacketEvalOptions(max_new_tokens=2)
    harness = PacketHarness(loaded, PacketComposer(loaded, tmp_path / "p", adapter, resident_bytes=0), opts)
    prompt = packet_prompt(loaded.tokenizer, list(FACTS[:3]), QUESTION, KnowledgeFormat())
    harness.prepare(prompt)
    warmed: list[str] = []
    real = type(harness).warm
    monkeypatch.setattr(type(harness), "warm", lambda self, m, p: warmed.append(m) or real(self, m, p))
    for method in METHODS:
        harness.run(method, prompt)
    assert warmed == list(METHODS)
    from kvpack_integrations.packet.store import adapter_id, packet_path

    damaged = packet_path(tmp_path / "p", prompt.documents[1], adapter_id(None), loaded.fingerprint)
    damaged.write_bytes(damaged.read_bytes()[:-5])  # prepare replaces it, untimed: no build inside a timing
    harness.prepare(prompt)
    harness.run("rerotated", prompt)
    unprepared = packet_prompt(loaded.tokenizer, ["An unseen passage."], QUESTION, KnowledgeFormat())
    with pytest.raises(RuntimeError, match="built inside the timing"):
        harness.run("rerotated", unprepared)
    records = tmp_path / "old.jsonl"

    def full_on_one_row() -> dict:
        options = PacketEvalOptions(methods=("full",), max_new_tokens=2)
        return run_packet_eval(loaded, _rows()[:1], None, options, records_path=records, progress=False)

    full_on_one_row()
    legacy = [{**json.loads(line), "config": None} for line in records.read_text().splitlines()]
    records.write_text("".join(json.dumps(r) + "\n" for r in legacy))
    assert full_on_one_row()["records_set_aside"] == 1  # nothing says whose settings they are: redone
    assert len(records.read_text().splitlines()) == 2


def test_a_method_whose_settings_changed_is_the_only_one_redone(tmp_path) -> None:
    """Settings are recorded per method: another adapter redoes packet and reuses full's answers."""
    loaded = make_model("llama")
    records = tmp_path / "r.jsonl"
    opts = PacketEvalOptions(methods=("full", "packet"), max_new_tokens=2)

    def run(adapter: PacketAdapter) -> dict:
        return run_packet_eval(loaded, _rows(), adapter, opts, records_path=records, progress=False)

    first = run(PacketAdapter.initial(loaded, 2, 2))
    assert first["records_set_aside"] == 0 and len(records.read_text().splitlines()) == 4
    second = run(PacketAdapter.initial(loaded, 3, 3))
    added = [json.loads(line) for line in records.read_text().splitlines()[4:]]
    assert [r["method"] for r in added] == ["packet", "packet"] and second["records_set_aside"] == 2
    assert second["methods"]["full"] == first["methods"]["full"]  # full's records reused as they were


def test_the_eval_loads_every_methods_packets_from_the_store_whatever_the_environment(tmp_path, monkeypatch) -> None:
    """With the resident and host tiers switched on in the environment, every method of every row still
    reads its packet files inside its timing (a method after another must not find them in memory)."""
    from .support.spies import packet_file_reads

    monkeypatch.setenv("KVPACK_PACKET_HOST_MB", "64")
    monkeypatch.setenv("KVPACK_PACKET_RESIDENT_MB", "64")
    reads = packet_file_reads(monkeypatch)
    row = _rows()[0]
    options = PacketEvalOptions(methods=("rerotated", "naive"), max_new_tokens=2)
    run_packet_eval(make_model("llama"), [row], None, options, store=tmp_path / "p", progress=False)
    assert len(reads) == 2 * len(row.passages)  # both methods read the same plain packets, each for itself
