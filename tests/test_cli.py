"""Layer 9: the `kvpack` command line, end to end on a tiny model saved to disk (local-directory loading)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpack_integrations.cli.main import main

from .conftest import FACTS
from .support.tiny_models import make_model


def _save(tmp: Path, family: str, seed: int = 0, **kw) -> str:
    loaded = make_model(family, seed, **kw)
    out = tmp / f"{family}-{seed}"
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return _save(tmp_path_factory.mktemp("models"), "qwen2")


def run(capsys, *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()
    if "--json" in argv:  # `kvpack ... --json | jq` works: everything else goes to stderr
        assert len(out) == 1, out
    return code, json.loads(out[-1])


def _changed_copy(rows: Path, where: Path) -> Path:
    """The same file name in another folder, its first question changed: other data, same name."""
    where.mkdir()
    changed = [json.loads(line) for line in rows.read_text().splitlines()]
    changed[0]["question"] = "Who builds the battery?"
    (where / rows.name).write_text("\n".join(json.dumps(r) for r in changed))
    return where / rows.name


@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    path = tmp_path / "facts.txt"
    path.write_text("\n".join(FACTS) + "\n\n")
    return path


def test_build_ask_list_roundtrip(capsys, tmp_path, model_dir, facts_file) -> None:
    common = ["--model", model_dir, "--store", str(tmp_path / "s"), "--json"]
    code, built = run(capsys, "build", str(facts_file), "--kb", "demo", *common)
    assert code == 0 and built["facts"] == 3 and built["segments"] == 5 and built["exact"] is True
    assert "ignored" not in built
    code, again = run(capsys, "build", str(facts_file), "--kb", "demo", "--dims", "8", *common)
    assert code == 0 and again["ignored"].startswith("--dims: the facts fit a pack")  # said, not dropped silently
    code, kv = run(capsys, "ask", "Which company makes the battery?", "--kb", "demo", "--max-new-tokens", "12", *common)
    code2, rag = run(
        capsys,
        "ask",
        "Which company makes the battery?",
        "--kb",
        "demo",
        "--mode",
        "rag",
        "--max-new-tokens",
        "12",
        *common,
    )
    assert code == code2 == 0
    assert kv["answer"] == rag["answer"]
    assert kv["usage"]["cached_tokens"] == built["tokens"] and rag["usage"]["cached_tokens"] == 0
    assert kv["usage"]["prefilled_tokens"] < rag["usage"]["prefilled_tokens"]
    assert "ignored" not in kv
    ask = ["ask", "Which company makes the battery?", "--kb", "demo", "--max-new-tokens", "2", *common]
    code, routed = run(capsys, *ask, "--k", "2", "--host", "localhost", "--port", "9")  # the name is a pack
    assert code == 0 and routed["ignored"] == "--k, --host, --port: 'demo' is a pack, so nothing is routed"
    code, err = run(capsys, *ask, "--packet-adapter", "none")  # known before any work: refused
    assert code == 2 and err["error"].startswith("--packet-adapter would be ignored: --mode kv composes no packets")
    code, err = run(capsys, *ask, "--stream")
    assert code == 2 and err["error"] == "--stream would be ignored: --json prints one line once the answer is complete"
    listing_args = ["--store", str(tmp_path / "s"), "--json"]  # list loads no model: it takes no --model
    code, listing = run(capsys, "list", *listing_args)
    assert [k["kb"] for k in listing["knowledge_bases"]] == ["demo"]
    # a damaged pack is listed as such, beside the whole ones
    broken = tmp_path / "s" / "packs" / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    code, listing = run(capsys, "list", *listing_args)
    assert code == 0 and [k["kb"] for k in listing["knowledge_bases"]] == ["broken", "demo"]
    assert "error" in listing["knowledge_bases"][0] and listing["knowledge_bases"][1]["facts"] == 3


def test_json_errors_of_every_kind(capsys, tmp_path, model_dir) -> None:
    """--json ends with one JSON line for usage errors and errors that are not kvpack's too; an --output
    that cannot be written loses no results."""
    with pytest.raises(SystemExit) as exit_info:
        main(["rebalance", "--kb", "x", "--banks", "two", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert exit_info.value.code == 2 and json.loads(out[-1]) == {
        "error": "argument --banks: expected a whole number >= 1, got 'two'",
        "type": "UsageError",
    }
    facts = tmp_path / "syn.jsonl"
    run(capsys, "synthesize", "20", "--output", str(facts), "--json")
    blocked = tmp_path / "file"
    blocked.write_text("")
    args = ["eval", "routing", "--facts", str(facts), "--kb-dir", str(tmp_path / "kb"), "--routing-only"]
    code, out = run(capsys, *args, "--output", str(blocked / "sum.json"), "--json")
    assert code == 2 and out["routing_accuracy"] == 1.0 and "could not write" in out["output_error"]
    (tmp_path / "f.txt").write_text("A fact.\n")
    code, out = run(
        capsys, "build", str(tmp_path / "f.txt"), "--kb", "d", "--model", model_dir, "--store", str(blocked), "--json"
    )
    assert code == 2 and out["type"] == "InvalidInputError" and f"pack store {blocked} is a file" in out["error"]
    for argv, problem in (
        (["eval", "packet", "--data", str(facts), "--limit", "0"], "argument --limit: expected a whole number >= 1"),
        (["eval", "packet", "--data", str(facts), "--jso"], "unrecognized arguments: --jso"),
        (["eval", "packet", "--data", str(facts), "--store", "s"], "unrecognized arguments: --store"),
        (["list", "--model", "m"], "unrecognized arguments: --model"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--json"])
        out = capsys.readouterr().out.strip().splitlines()
        assert exit_info.value.code == 2 and problem in json.loads(out[-1])["error"], argv
    code, out = run(capsys, "packet", "biographies", "3", "--output", str(tmp_path), "--json")
    assert code == 2 and f"biographies file {tmp_path} is a folder" in out["error"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"fact": "caf\u00e9"}\n'.encode("latin-1"))
    code, out = run(capsys, "eval", "routing", "--facts", str(latin), "--routing-only", "--json")
    assert code == 2 and "is not UTF-8 text" in out["error"]
    # a name only a pack can have, with a Chroma directory that is not there: unknown, and nothing created
    none = tmp_path / "none"
    store = str(tmp_path / "s")
    code, out = run(capsys, "ask", "q?", "--kb", "v1.2", "--kb-dir", str(none), "--store", store, "--json")
    assert code == 2 and out["type"] == "UnknownKnowledgeBaseError" and "no knowledge base named 'v1.2'" in out["error"]
    assert not none.exists()


def test_jsonl_facts_and_half_precision(capsys, tmp_path, model_dir) -> None:
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps({"fact": f}) for f in FACTS[:2]) + "\n" + json.dumps({"text": FACTS[2]}))
    code, built = run(
        capsys,
        "build",
        str(path),
        "--kb",
        "half",
        "--storage-dtype",
        "float16",
        "--model",
        model_dir,
        "--store",
        str(tmp_path / "s"),
        "--json",
    )
    assert code == 0 and built["facts"] == 3 and built["exact"] is False and built["storage_dtype"] == "float16"


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("\n  \n", ".txt", "no facts"),
        ('{"fact": "ok"}\n{not json}\n', ".jsonl", "facts.jsonl:2: not valid JSON"),
        ('{"title": "x"}\n', ".jsonl", "facts.jsonl:1: expected an object"),
        ("a,b\n", ".csv", "unsupported facts file"),
    ],
)
def test_bad_fact_files_are_named(capsys, tmp_path, model_dir, content, suffix, message) -> None:
    path = tmp_path / f"facts{suffix}"
    path.write_text(content)
    code, err = run(capsys, "build", str(path), "--kb", "x", "--model", model_dir, "--store", str(tmp_path), "--json")
    assert code == 2 and message in err["error"]


def test_unknown_kb_and_foreign_pack(capsys, tmp_path, model_dir, facts_file) -> None:
    store = str(tmp_path / "s")
    code, err = run(capsys, "ask", "q?", "--kb", "nope", "--model", model_dir, "--store", store, "--json")
    assert code == 2 and err["type"] == "UnknownKnowledgeBaseError" and "'nope'" in err["error"]
    run(capsys, "build", str(facts_file), "--kb", "kb", "--model", model_dir, "--store", store, "--json")
    other = _save(tmp_path, "qwen2", seed=7)
    code, err = run(capsys, "ask", "q?", "--kb", "kb", "--model", other, "--store", store, "--json")
    assert code == 2 and err["type"] == "FingerprintMismatchError"
    assert "weights_hash" in err["error"] and "Rebuild it" in err["error"]
    # the rag mode only needs the facts, so it still answers
    code, ok = run(
        capsys,
        "ask",
        "q?",
        "--kb",
        "kb",
        "--mode",
        "rag",
        "--max-new-tokens",
        "4",
        "--model",
        other,
        "--store",
        store,
        "--json",
    )
    assert code == 0 and ok["usage"]["cached_tokens"] == 0


def test_knowledge_longer_than_the_window(capsys, tmp_path) -> None:
    small = _save(tmp_path, "llama", max_positions=128)
    path = tmp_path / "long.txt"
    path.write_text("\n".join(FACTS * 10))
    common = ["--kb", "big", "--model", small, "--store", str(tmp_path), "--kb-dir", str(tmp_path / "kb"), "--json"]
    code, built = run(capsys, "build", str(path), *common)  # too long for a pack: a Chroma knowledge base
    assert code == 0 and built["backend"] == "chroma" and "context window of 128" in built["reason"]
    assert built["facts"] == len(FACTS) and built["duplicates_in_file"] == 9 * len(FACTS)


def test_missing_model_path_is_a_clear_error(capsys, tmp_path, facts_file) -> None:
    code, err = run(capsys, "build", str(facts_file), "--kb", "x", "--model", str(tmp_path / "nowhere"), "--json")
    assert code == 2 and "does not exist" in err["error"]


def _rows(tmp_path: Path) -> Path:
    rows = [
        {
            "question": "Which company makes the battery?",
            "answers": ["Quill Energy"],
            "contexts": [
                {"title": "Q", "text": FACTS[2], "gold": True},
                {"title": "N", "text": FACTS[0], "gold": False},
                {"title": "A", "text": FACTS[1], "gold": False},
            ],
        },
        {
            "question": "How long does the Aurora X2 fly?",
            "answers": ["48 minutes"],
            "contexts": [
                {"title": "A", "text": FACTS[1], "gold": True},
                {"title": "Q", "text": FACTS[2], "gold": False},
                {"title": "N", "text": FACTS[0], "gold": False},
            ],
        },
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_eval_equivalence_json_and_resume(capsys, tmp_path, model_dir) -> None:
    data, records = _rows(tmp_path), tmp_path / "rec.jsonl"
    args = [
        "eval",
        "equivalence",
        "--data",
        str(data),
        "--raw",
        "--max-new-tokens",
        "8",
        "--records",
        str(records),
        "--model",
        model_dir,
        "--store",
        str(tmp_path / "s"),
        "--json",
    ]
    code, s = run(capsys, *args)
    assert code == 0 and s["n"] == 2 and s["divergences"] == 0 and s["exact"] is True
    for key in (
        "em_kv",
        "em_rag",
        "f1_kv",
        "f1_rag",
        "prompt_tokens_kv",
        "prompt_tokens_rag",
        "ttft_ms_kv",
        "ttft_ms_rag",
        "model",
        "em_kv_raw",
        "em_raw_minus_kv",
    ):
        assert key in s
    assert s["prompt_tokens_kv"] < s["prompt_tokens_rag"]
    assert len(records.read_text().splitlines()) == 2
    code, again = run(capsys, *args)  # resumed: nothing recomputed
    assert again["ttft_ms_kv"] == s["ttft_ms_kv"] and len(records.read_text().splitlines()) == 2
    code, one = run(capsys, *args, "--limit", "1")  # a shorter run of the same data: its row is reused
    assert code == 0 and one["n"] == 1 and len(records.read_text().splitlines()) == 2
    other = _changed_copy(data, tmp_path / "other")  # same file name, other rows: refused, nothing recorded
    code, err = run(capsys, *[str(other) if a == str(data) else a for a in args])
    assert code == 2 and "holds records of other data (row 0 differs)" in err["error"]
    assert len(records.read_text().splitlines()) == 2
    assert not (tmp_path / "s" / "packs").exists()  # the user's own store is never touched
    packs = (tmp_path / "s" / "eval-equivalence" / "packs").iterdir()
    assert not [p for p in packs if not p.name.startswith(".")]  # per-row packs cleaned up (lock files stay)


def test_an_interrupted_equivalence_row_leaves_no_pack(capsys, tmp_path, model_dir, monkeypatch) -> None:
    from kvpack_integrations.evaluation import equivalence

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(equivalence, "_kv", interrupted)
    args = ["eval", "equivalence", "--data", str(_rows(tmp_path)), "--raw", "--model", model_dir]
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--store", str(tmp_path / "s"), "--json"])
    packs = tmp_path / "s" / "eval-equivalence" / "packs"
    assert packs.is_dir() and not [p.name for p in packs.iterdir() if not p.name.startswith(".")]


def test_eval_accumulation(capsys, tmp_path, model_dir) -> None:
    code, s = run(
        capsys,
        "eval",
        "accumulation",
        "--data",
        str(_rows(tmp_path)),
        "--steps",
        "3",
        "--max-new-tokens",
        "6",
        "--model",
        model_dir,
        "--json",
    )
    assert code == 0 and [st["k"] for st in s["steps"]] == [1, 2, 3] and s["all_identical"]
    assert s["steps"][2]["tokens_kv"] < s["steps"][2]["tokens_rag"]
    assert s["steps"][2]["build_tokens_kv"] < s["steps"][2]["tokens_rag"]  # only the new passage was added
    data, records = _rows(tmp_path), tmp_path / "acc.jsonl"
    common = ["--steps", "2", "--max-new-tokens", "4", "--records", str(records), "--model", model_dir, "--json"]
    code, _ = run(capsys, "eval", "accumulation", "--data", str(data), *common)
    assert code == 0 and len(records.read_text().splitlines()) == 2
    other = _changed_copy(data, tmp_path / "other")
    code, err = run(capsys, "eval", "accumulation", "--data", str(other), *common)
    assert code == 2 and "holds records of other data" in err["error"]
    code, err = run(
        capsys, "eval", "accumulation", "--data", str(_rows(tmp_path)), "--steps", "9", "--model", model_dir, "--json"
    )
    assert code == 2 and "fewer than 9 passages" in err["error"]


def test_eval_packet_cli_cleans_its_temporary_store_and_resumes_a_shorter_run(
    capsys, tmp_path, model_dir, monkeypatch
) -> None:
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    data, records = _rows(tmp_path), tmp_path / "packet.jsonl"
    common = ["--methods", "full,rerotated", "--max-new-tokens", "4", "--model", model_dir, "--json"]
    common += ["--packet-adapter", "none"]  # the plain methods need none; the option means what it means elsewhere
    code, s = run(capsys, "eval", "packet", "--data", str(data), "--records", str(records), *common)
    assert code == 0 and s["n"] == 2 and set(s["methods"]) == {"full", "rerotated"}
    assert s["methods"]["rerotated"]["approximate"] and not s["methods"]["full"]["approximate"]
    assert len(records.read_text().splitlines()) == 4
    assert not list(scratch.iterdir())  # the temporary packet store went with the run
    code, one = run(capsys, "eval", "packet", "--data", str(data), "--limit", "1", "--records", str(records), *common)
    assert code == 0 and one["n"] == 1 and len(records.read_text().splitlines()) == 4  # nothing recomputed
    recorded = [json.loads(line) for line in records.read_text().splitlines()]
    [full_row0] = [r for r in recorded if (r["row"], r["method"]) == (0, "full")]
    assert one["methods"]["full"]["f1"] == full_row0["f1"]
    code, err = run(capsys, "eval", "packet", "--data", str(data), "--records", str(tmp_path), *common)
    assert code == 2 and f"records file {tmp_path} is a folder" in err["error"]
    code, err = run(capsys, "eval", "packet", "--data", str(data), "--methods", "packet", *common[2:])
    assert code == 2 and "no adapter was given" in err["error"]
    store = tmp_path / "packets"  # --packet-store, as in build and ask, keeps the packets
    one_row = ["--data", str(data), "--limit", "1", "--packet-store", str(store)]
    code, kept = run(capsys, "eval", "packet", *one_row, *common)
    assert code == 0 and kept["n"] == 1 and list(store.rglob("*.safetensors"))


def test_ask_stream_prints_the_answer_and_a_usage_line(capsys, tmp_path, model_dir, facts_file) -> None:
    common = ["--model", model_dir, "--store", str(tmp_path / "s")]
    assert main(["build", str(facts_file), "--kb", "kb", *common]) == 0
    capsys.readouterr()
    assert (
        main(["ask", "Which company makes the battery?", "--kb", "kb", "--stream", "--max-new-tokens", "8", *common])
        == 0
    )
    streamed = capsys.readouterr().out
    code, js = run(
        capsys, "ask", "Which company makes the battery?", "--kb", "kb", "--max-new-tokens", "8", *common, "--json"
    )
    assert code == 0
    assert streamed.startswith(js["answer"])
    assert "[kv]" in streamed and "from cache" in streamed and "exact" in streamed


def test_synthesize_and_eval_routing(capsys, tmp_path, model_dir) -> None:
    facts = tmp_path / "syn.jsonl"
    code, out = run(capsys, "synthesize", "60", "--output", str(facts), "--json")
    assert code == 0 and out["n"] == 60 and len(facts.read_text().splitlines()) == 60
    common = ["--facts", str(facts), "--kb-dir", str(tmp_path / "kb"), "--model", model_dir, "--json"]
    code, s = run(capsys, "eval", "routing", *common, "--limit", "4", "--max-new-tokens", "4")
    assert code == 0
    assert s["n_facts"] == 60 and s["n_banks"] == 3 and s["n_questions"] == 4 and s["dtype"] == "float32"
    for key in ("routing_accuracy", "answer_accuracy", "oracle_answer_accuracy"):
        assert 0.0 <= s[key] <= 1.0
    assert s["bytes_per_fact"] > 0 and s["build_facts_per_s"] > 0 and s["p95_overhead_ms"] >= s["p50_overhead_ms"]
    # dense only, every bank probed: flat search, and the KB (reused, not rebuilt) holds every fact
    routing = ["--facts", str(facts), "--kb-dir", str(tmp_path / "kb"), "--json"]  # no language model options
    dense = ["--routing-only", "--probes", "3", "--lexical-weight", "0"]
    code, flat = run(capsys, "eval", "routing", *routing, *dense)
    assert code == 0 and flat["build_facts_per_s"] is None and flat["answer_accuracy"] is None
    assert flat["dtype"] is None and flat["model"] is None  # routing alone loads no language model
    assert flat["routing"].startswith("dense") and flat["routing_accuracy"] >= 0.7  # MiniLM on invented names
    code, hybrid = run(capsys, "eval", "routing", *routing, "--routing-only")  # one probe, BM25 on
    assert hybrid["routing"].startswith("hybrid") and hybrid["routing_accuracy"] == 1.0 and hybrid["n_questions"] == 60
    name = "eval-syn"  # the knowledge base eval routing named after the file
    code, out = run(capsys, "rebalance", "--kb", name, "--kb-dir", str(tmp_path / "kb"), "--banks", "5", "--json")
    assert code == 0 and out == {**out, "facts": 60, "banks_before": 3, "banks": 5}
    code, again = run(capsys, "eval", "routing", *routing, "--routing-only")
    assert again["n_banks"] == 5 and again["routing_accuracy"] == 1.0
    code, err = run(capsys, "rebalance", "--kb", "nope", "--kb-dir", str(tmp_path / "kb"), "--json")
    assert code == 2 and "no knowledge base named 'nope'" in err["error"]
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"fact": null, "question": "q?", "answer": "a"}\n')
    code, err = run(capsys, "eval", "routing", "--facts", str(nulls), "--routing-only", "--json")
    assert code == 2 and "must be strings, the fact non-empty" in err["error"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"fact": "x"}\n')
    code, err = run(capsys, "eval", "routing", "--facts", str(bad), "--model", model_dir, "--json")
    assert code == 2 and "expected {fact, question, answer}" in err["error"]
    # routing alone loads no language model, so model options are refused, not ignored; another file of
    # as many rows with the same name is refused, not routed against the old base
    for option in (["--model", "/nonexistent"], ["--dtype", "float16"], ["--max-new-tokens", "8"]):
        code, err = run(capsys, "eval", "routing", *routing, *option, "--routing-only")
        assert code == 2 and err["error"] == f"{option[0]} would be ignored: --routing-only loads no language model"
    other = tmp_path / "other" / "syn.jsonl"
    run(capsys, "synthesize", "60", "--seed", "7", "--output", str(other), "--json")
    code, err = run(capsys, "eval", "routing", "--facts", str(other), *routing[2:], "--routing-only")
    assert code == 2 and "holds other facts than the file" in err["error"]
    # synthesize refuses a bad count without touching the file it was to write
    before = facts.read_text()
    with pytest.raises(SystemExit) as exit_info:  # a usage error now, caught before anything runs
        main(["synthesize", "0", "--output", str(facts), "--json"])
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exit_info.value.code == 2 and "expected a whole number >= 1, got 0" in err["error"]
    assert facts.read_text() == before


def test_build_switches_to_a_chroma_knowledge_base_when_facts_exceed_the_window(capsys, tmp_path) -> None:
    small = _save(tmp_path, "llama", max_positions=256)
    facts = tmp_path / "many.txt"
    facts.write_text("\n".join(f"Fact number {i} says the widget weighs {i} grams." for i in range(80)))
    common = ["--kb", "many", "--model", small, "--store", str(tmp_path / "s"), "--kb-dir", str(tmp_path / "kb")]
    from kvpack_integrations import build_pack, load_model
    from kvpack_integrations.composition import RadixTree
    from kvpack_integrations.segments import PackStore

    loaded = load_model(small)  # first a pack of the same name, from a fact file that fitted
    build_pack(loaded, RadixTree(loaded.fingerprint), PackStore(tmp_path / "s"), "many", ["The widget is red."])
    code, built = run(capsys, "build", str(facts), *common, "--json")
    assert code == 0 and built["backend"] == "chroma" and "context window of 256" in built["reason"]
    assert built["facts"] == 80 and built["banks"] == 4 and built["replaced_pack"] is True
    facts.write_text(facts.read_text() + "\nA new fact about the widget's colour: blue.")
    code, again = run(
        capsys, "build", str(facts), *common, "--instruction", "Facts:", "--storage-dtype", "float16", "--json"
    )  # the same base grows by the new fact; options only packs use are named as ignored
    assert code == 0 and again["added"] == 1 and again["already_present"] == 80 and again["facts"] == 81
    assert again["replaced_pack"] is False and again["ignored"].startswith("--instruction, --storage-dtype:")
    assert "ignored" not in built
    # ask answers from the Chroma base (the old pack is gone): the routed facts are the knowledge
    question = "How much does the widget of fact number 17 weigh?"
    code, asked = run(capsys, "ask", question, *common, "--k", "2", "--max-new-tokens", "3", "--json")
    assert code == 0 and asked["backend"] == "chroma" and len(asked["routed"]) == 2
    assert "Fact number 17 says" in asked["routed"][0]["text"] and asked["usage"]["exact"] is True
    code, rag = run(capsys, "ask", question, *common, "--k", "2", "--max-new-tokens", "3", "--mode", "rag", "--json")
    assert code == 0 and rag["answer"] == asked["answer"]
    code, err = run(capsys, "ask", question, *common[:-2], "--kb-dir", str(tmp_path / "nokb"), "--json")
    assert code == 2 and "no pack in" in err["error"] and "no Chroma knowledge base" in err["error"]
    # list shows the Chroma base (and no pack of that name any more); a missing Chroma dir is not created
    code, listing = run(capsys, "list", "--store", str(tmp_path / "s"), "--kb-dir", str(tmp_path / "kb"), "--json")
    assert code == 0 and listing["knowledge_bases"] == []
    [row] = listing["chroma_knowledge_bases"]
    assert row["kb"] == "many" and row["facts"] == 81 and row["banks"] >= 4 and row["embedder"]
    code, listing = run(capsys, "list", "--store", str(tmp_path / "s"), "--kb-dir", str(tmp_path / "none"), "--json")
    assert code == 0 and listing["chroma_knowledge_bases"] == [] and not (tmp_path / "none").exists()


def test_steer_build_and_ask_with_steering(capsys, tmp_path, model_dir, facts_file) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"positive": "Certainly, I would be delighted.", "negative": "yeah ok"}\n'
        '{"positive": "Kindly note the following.", "negative": "so basically"}\n'
    )
    vec = tmp_path / "formal.safetensors"
    code, built = run(
        capsys, "steer", "build", str(pairs), "--out", str(vec), "--layers", "all", "--model", model_dir, "--json"
    )
    assert code == 0 and built["pairs"] == 2 and built["name"] == "formal" and vec.is_file()
    assert len(built["delta_norm_per_layer"]) == len(built["layers"]) and max(built["delta_norm_per_layer"]) > 0
    common = ["--model", model_dir, "--store", str(tmp_path / "s"), "--json", "--max-new-tokens", "8"]
    run(
        capsys, "build", str(facts_file), "--kb", "demo", "--model", model_dir, "--store", str(tmp_path / "s"), "--json"
    )
    code, plain = run(capsys, "ask", "Which company makes the battery?", "--kb", "demo", *common)
    code, steered = run(
        capsys, "ask", "Which company makes the battery?", "--kb", "demo", "--steer", f"{vec}:1", *common
    )
    assert code == 0 and steered["usage"]["steering"] == ["formal:1"] and steered["usage"]["exact"] is False
    assert plain["usage"]["steering"] == [] and steered["answer"] != plain["answer"]
    code, zero = run(capsys, "ask", "Which company makes the battery?", "--kb", "demo", "--steer", f"{vec}:0", *common)
    assert zero["answer"] == plain["answer"]
    code, err = run(capsys, "ask", "q?", "--kb", "demo", "--steer", str(tmp_path / "missing.safetensors"), *common)
    assert code == 2 and "no steering vector file" in err["error"]
    other = _save(tmp_path, "llama")
    code, err = run(capsys, "ask", "q?", "--kb", "demo", "--steer", str(vec), *common[:-2], "--model", other)
    assert code == 2 and err["type"] in ("FingerprintMismatchError",)
    pairs.write_text('{"positive": "only one side"}\n')
    code, err = run(capsys, "steer", "build", str(pairs), "--out", str(vec), "--model", model_dir, "--json")
    assert code == 2 and "expected {positive, negative}" in err["error"]


def test_steer_build_refuses_bad_options_before_the_model_loads(capsys, tmp_path, model_dir, monkeypatch) -> None:
    """A folder as --out, an unknown --layers name and a non-finite --alpha fail by name up front, not
    after the model loaded and every pair ran (a folder as --out used to end in a raw IsADirectoryError)."""
    import kvpack_integrations.cli.steer as steer_cli

    def no_model(args):
        raise AssertionError("the model was loaded for a command that could not succeed")

    monkeypatch.setattr(steer_cli, "loaded_model", no_model)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"positive": "Certainly, I would be delighted.", "negative": "yeah ok"}\n')
    (tmp_path / "folder").mkdir()
    vec = str(tmp_path / "v.safetensors")
    for extra, problem in (
        (["--out", str(tmp_path / "folder")], f"steering vector file {tmp_path / 'folder'} is a folder"),
        (["--out", str(pairs / "v.safetensors")], f"{pairs} is a file, not a folder"),
        (["--out", vec, "--layers", "midle"], "unknown layer range 'midle'"),
        (["--out", vec, "--alpha", "nan"], "alpha must be a finite number, got nan"),
        (["--out", vec, "--alpha", "inf"], "alpha must be a finite number, got inf"),
    ):
        code, err = run(capsys, "steer", "build", str(pairs), *extra, "--model", model_dir, "--json")
        assert code == 2 and err["type"] == "InvalidInputError" and problem in err["error"], extra
    assert not Path(vec).exists()


def test_eval_steering_on_a_tiny_model(capsys, tmp_path, model_dir) -> None:
    records = tmp_path / "steer.jsonl"
    args = ["eval", "steering", "--data", str(_rows(tmp_path)), "--limit", "2", "--tasks", "2", "--alphas", "0.5,1"]
    code, s = run(capsys, *args, "--max-new-tokens", "6", "--records", str(records), "--model", model_dir, "--json")
    assert code == 0 and s["n_tasks"] == 2 and min(s["n_pairs"].values()) >= 20
    assert [(r["layers"], r["alpha"]) for r in s["sweep"]] == [("mid", 0.5), ("mid", 1.0), ("late", 0.5), ("late", 1.0)]
    assert set(s["layer_scores"]) == {"early", "mid", "late", "all"} and s["coherence_threshold"] == 0.95
    best = s["best_coherent"]
    if best is not None:  # a random tiny model rarely writes parsable code, but when it does the point is complete
        assert best["coherence"] >= 0.95 and best["over_baseline"] == best["score"] - s["baseline_score"]
    assert [r["alpha"] for r in s["dual_channel"]] == [0.0, 0.2, 0.5, 0.7, 1.0, 1.5] and s["dual_channel_rows"] == 2
    assert -1.0 <= s["composition"]["cos"] <= 1.0 and 0.0 <= s["baseline_score"] <= 1.0
    arms = {json.loads(line)["arm"] for line in records.read_text().splitlines()}
    assert {"baseline", "text_prompt", "sweep_mid_0.5", "sweep_late_1", "layers_all", "defensive+docstrings"} <= arms
    assert "dual_1.5" in arms and "layers_mid" not in arms  # the mid and late thirds come from the sweep
    code, err = run(capsys, *args, "--layers", "mid,middle", "--model", model_dir, "--json")
    assert code == 2 and "'mid,middle'" in err["error"] and "early" in err["error"]


def test_eval_steering_resumes_an_interrupted_run_from_its_records(capsys, tmp_path, model_dir, monkeypatch) -> None:
    from kvpack_integrations.engine.engine import Engine

    records = tmp_path / "steer.jsonl"
    args = ["eval", "steering", "--data", str(_rows(tmp_path)), "--limit", "2", "--tasks", "2", "--alphas", "1"]
    args += ["--layers", "late", "--max-new-tokens", "4", "--records", str(records), "--model", model_dir, "--json"]
    code, whole = run(capsys, *args)
    lines = records.read_text().splitlines()
    assert code == 0 and len(lines) == 2 * 2 + 2 + 3 * 2 + 2 * 2 + 6 * 2  # replies as they were made
    # a run killed mid-way: half the replies logged, the next one cut short while it was written
    half = len(lines) // 2
    records.write_text("\n".join(lines[:half]) + "\n" + lines[half][:25])
    made = []
    real = Engine.generate

    def counted(self, *a, **k):
        made.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(Engine, "generate", counted)
    code, resumed = run(capsys, *args)
    assert code == 0 and len(made) == len(lines) - half  # only the replies that were not logged
    assert {k: v for k, v in resumed.items() if k != "machine"} == {k: v for k, v in whole.items() if k != "machine"}
    made.clear()
    code, _ = run(capsys, *[a if a != "4" else "5" for a in args])  # other options: nothing is reused
    assert code == 0 and len(made) == len(lines)


def test_packet_train_continue_and_held_out_divergence(capsys, tmp_path, model_dir) -> None:
    data, first, tuned = str(_rows(tmp_path)), tmp_path / "first.safetensors", tmp_path / "tuned.safetensors"
    small = ["--accumulation", "1", "--lr", "0.05", "--header-tokens", "2", "--trailer-tokens", "2"]
    common = ["--model", model_dir, "--json"]
    train = ["packet", "train", "--data", data, "--output", str(first), "--steps", "6"]
    code, trained = run(capsys, *train, *small, *common)
    assert code == 0 and trained["steps"] == 6 and first.is_file()
    other = str(_changed_copy(Path(data), tmp_path / "other"))  # continuing the run on other rows: refused
    code, err = run(capsys, "packet", "train", "--data", other, "--out", str(first), "--steps", "7", *small, *common)
    assert code == 2 and "was written for other training data" in err["error"]
    shorter = ["--limit", "1", "--out", str(first), "--steps", "7"]
    code, err = run(capsys, "packet", "train", "--data", data, *shorter, *small, *common)
    assert code == 2 and "was written for other training data" in err["error"]
    code, more = run(
        capsys,
        "packet",
        "train",
        "--data",
        data,
        "--out",
        str(tuned),
        "--init",
        str(first),
        "--steps",
        "2",
        *small,
        *common,
    )
    assert code == 0 and more["kl_first"] < trained["kl_first"]  # it starts from the trained soft tokens
    scores = {}
    for name in ("none", str(first), str(tuned)):
        code, scored = run(capsys, "packet", "divergence", "--data", data, "--adapter", name, "--limit", "2", *common)
        assert code == 0 and scored["n"] == 2 and len(scored["per_row"]) == 2 and scored["adapter"] == name
        scores[name] = scored["kl"]
    assert all(kl > 0 for kl in scores.values()) and len(set(scores.values())) == 3
    code, err = run(capsys, "packet", "divergence", "--data", data, *common)
    assert code == 2 and "no adapter is shipped" in err["error"]
    code, err = run(
        capsys, "packet", "divergence", "--data", data, "--adapter", str(tmp_path / "gone.safetensors"), *common
    )
    assert code == 2 and "gone.safetensors" in err["error"]


def test_build_with_packets_and_ask_in_packet_modes(capsys, tmp_path, model_dir, facts_file) -> None:
    from kvpack_integrations.packet import PacketAdapter
    from kvpack_integrations.runtime.loader import load_model

    adapter = PacketAdapter.initial(load_model(model_dir), 2, 2).save(tmp_path / "adapter.safetensors")
    packets = ["--packet-store", str(tmp_path / "packets"), "--packet-adapter", str(adapter)]
    common = ["--model", model_dir, "--store", str(tmp_path / "s"), "--json"]
    code, built = run(capsys, "build", str(facts_file), "--kb", "demo", "--packets", "packet", *packets, *common)
    assert code == 0 and built["packets"]["built"] == 3 and built["packets"]["composition"] == "packet"
    question = ["ask", "Which company makes the battery?", "--kb", "demo", "--max-new-tokens", "6"]
    code, answer = run(capsys, *question, "--mode", "packet", *packets, *common)
    usage = answer["usage"]
    assert code == 0 and usage["strategy"] == "packet" and usage["exact"] is False
    assert not any("cached now" in n for n in usage["notes"])  # the build stored every packet
    code, err = run(capsys, *question, "--mode", "blend", *packets, *common)  # blend wraps nothing
    assert code == 2 and err["error"].startswith("--packet-adapter would be ignored: --mode blend composes plain")
    code, blended = run(capsys, *question, "--mode", "blend", *packets[:2], *common)
    assert code == 0 and blended["usage"]["strategy"] == "blend"
    assert any("3 of them cached now" in n for n in blended["usage"]["notes"])  # plain packets, first use


def test_build_clusters_a_chroma_base_an_earlier_build_left_without_banks(capsys, tmp_path, monkeypatch) -> None:
    """A build cut during k-means left every fact stored and no bank; building again found every id present,
    added nothing and so never clustered: routing stayed broken for good."""
    import hashlib

    from kvpack_integrations.knowledge.knowledge_base import KnowledgeBase

    lines = [f"Fact number {i} says the widget weighs {i} grams." for i in range(30)]
    facts = tmp_path / "facts.txt"
    facts.write_text("\n".join(lines))
    cut = KnowledgeBase("cut", tmp_path / "kb")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cut, "rebalance", interrupted)
    with pytest.raises(KeyboardInterrupt):  # the ids `kvpack build` gives: content hashes
        cut.add(lines, ids=[hashlib.blake2b(f.encode(), digest_size=12).hexdigest() for f in lines], progress=False)
    monkeypatch.undo()
    assert len(cut) == 30 and cut.n_banks == 0
    common = ["--kb", "cut", "--chroma", "--kb-dir", str(tmp_path / "kb"), "--store", str(tmp_path / "s"), "--json"]
    code, built = run(capsys, "build", str(facts), *common)
    assert code == 0 and built["added"] == 0 and built["already_present"] == 30
    assert built["banks"] == 2 and built["reclustered"] is True
    code, again = run(capsys, "build", str(facts), *common)
    assert code == 0 and again["banks"] == 2 and again["reclustered"] is False
