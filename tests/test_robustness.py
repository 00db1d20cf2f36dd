"""Review findings kept fixed: resumable records, clear errors on odd inputs, no lossy inheritance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvpack_integrations import Engine, GenerationSettings, build_pack, knowledge_prompt, load_pack
from kvpack_integrations.cli.main import main
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.errors import InvalidInputError
from kvpack_integrations.evaluation.datasets import load_rows
from kvpack_integrations.evaluation.records import RecordLog
from kvpack_integrations.prompts import KnowledgeFormat
from kvpack_integrations.runtime import resolve_device

from .conftest import FACTS, QUESTION
from .support.tiny_models import make_model


def test_records_survive_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    log = RecordLog(path, {"c": 1})
    log.add(0, {"x": 1})
    with path.open("a") as fh:
        fh.write('{"row": 1, "con')  # the run was killed mid-write
    again = RecordLog(path, {"c": 1})
    assert again.done(0) and not again.done(1)
    again.add(1, {"x": 2})
    assert [r["row"] for r in RecordLog(path, {"c": 1}).ordered()] == [0, 1]
    other = RecordLog(path, {"c": 2})  # another configuration starts over, its records kept in the file
    assert not other.records and other.set_aside == 2 and len(path.read_text().splitlines()) == 3
    # with rows recorded, a record that does not say its row's digest (an older format) is redone, and counted
    digested = RecordLog(path, {"c": 1}, ["d0", "d1"])
    assert not digested.records and digested.set_aside == 2


def test_stop_given_as_a_string_is_one_sequence() -> None:
    assert GenerationSettings(stop="###").stop == ("###",)


def test_a_used_composed_cache_is_refused() -> None:
    loaded = make_model("qwen2")
    engine = Engine(loaded)
    ids = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat()).token_ids
    engine.cache_prefix(ids, [len(ids) - 5])
    composed = engine.compose(ids)
    engine.generate(ids, GenerationSettings(max_new_tokens=3), composed=composed)
    with pytest.raises(InvalidInputError, match="compose again"):
        engine.generate(ids, GenerationSettings(max_new_tokens=3), composed=composed)


def test_packs_built_on_half_precision_slices_are_recomputed_exactly(store) -> None:
    loaded = make_model("qwen2")
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "half", FACTS, storage_dtype=torch.float16)
    tree = RadixTree(loaded.fingerprint)
    load_pack(loaded, tree, store, "half")
    more = [*FACTS, "Kelmark has 14,000 people."]
    report = build_pack(loaded, tree, store, "full", more)
    assert report.manifest.lossless and report.prefilled_tokens == report.manifest.token_count
    fresh = build_pack(loaded, RadixTree(loaded.fingerprint), store, "fresh", more)
    assert fresh.manifest.segment_ids == report.manifest.segment_ids
    engine = Engine(loaded)
    load_pack(loaded, engine.tree, store, "full")
    ids = knowledge_prompt(loaded.tokenizer, more, QUESTION, KnowledgeFormat()).token_ids
    assert engine.generate(ids, GenerationSettings(max_new_tokens=4)).usage.exact


def test_store_listing_ignores_leftover_build_directories(store) -> None:
    loaded = make_model("qwen2")
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)
    leftover = store.packs_dir / ".old-kb-123"
    leftover.mkdir()
    (leftover / "manifest.json").write_text("{}")
    assert store.names() == ["kb"]


def test_malformed_data_rows_are_named(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "q", "answers": "Paris", "contexts": [{"text": "t"}]}))
    with pytest.raises(InvalidInputError, match=r"rows\.jsonl:1.*answers must be a list"):
        load_rows(path)
    path.write_text(json.dumps({"question": "q", "answers": ["a"], "contexts": ["t"]}))
    with pytest.raises(InvalidInputError, match="contexts must be a list of objects"):
        load_rows(path)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        load_rows(path)


def test_empty_question_and_unavailable_cuda(capsys, tmp_path: Path) -> None:
    assert main(["ask", "  ", "--kb", "x", "--store", str(tmp_path), "--json"]) == 2
    assert "question is empty" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA is not available"):
            resolve_device("cuda")
