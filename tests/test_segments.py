"""Layer 3: segment files and the pack store verify everything and lose nothing."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from kvpack_integrations import Engine, GenerationSettings, build_pack, knowledge_prompt, load_pack
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.errors import (
    CorruptSegmentError,
    EmptyKnowledgeError,
    FingerprintMismatchError,
    InvalidInputError,
    UnknownKnowledgeBaseError,
)
from kvpack_integrations.packet import PacketAdapter
from kvpack_integrations.prompts import KnowledgeFormat
from kvpack_integrations.runtime.fingerprint import NOT_RECORDED
from kvpack_integrations.runtime.loader import wrap_model
from kvpack_integrations.segments import PackStore, load_segment, save_segment

from .conftest import FACTS, QUESTION
from .support.disk_events import record_fsyncs_and_renames, synced_before_publishing
from .support.tiny_models import make_model


@pytest.fixture(scope="module")
def qwen():
    return make_model("qwen2")


def _first_segment_file(store: PackStore, name: str) -> Path:
    m = store.manifest(name)
    return store.pack_dir(name) / "segments" / f"{m.segment_ids[0]}.safetensors"


def test_roundtrip_is_bit_exact_and_leaves_no_temp_files(qwen, store: PackStore) -> None:
    engine = Engine(qwen)
    prompt = knowledge_prompt(qwen.tokenizer, FACTS, None, KnowledgeFormat())
    segments, _ = engine.cache_prefix(prompt.token_ids, prompt.knowledge_cuts)
    path = save_segment(segments[1], store.root / "one.safetensors")
    loaded = load_segment(path, qwen.fingerprint)
    assert loaded.id == segments[1].id and loaded.start == segments[1].start
    assert all(torch.equal(a, b) for a, b in zip(loaded.keys, segments[1].keys))
    assert all(torch.equal(a, b) for a, b in zip(loaded.values, segments[1].values))
    assert [p.name for p in store.root.iterdir()] == ["one.safetensors"]


def test_flipped_byte_truncation_and_garbage_are_refused(qwen, store: PackStore) -> None:
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    path = _first_segment_file(store, "kb")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptSegmentError, match="checksum"):
        load_pack(qwen, RadixTree(qwen.fingerprint), store, "kb")
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptSegmentError, match="unreadable or truncated"):
        load_pack(qwen, RadixTree(qwen.fingerprint), store, "kb")
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CorruptSegmentError):
        load_pack(qwen, RadixTree(qwen.fingerprint), store, "kb")
    path.unlink()
    with pytest.raises(CorruptSegmentError, match="missing"):
        load_pack(qwen, RadixTree(qwen.fingerprint), store, "kb")


def test_pack_from_another_model_is_refused_with_the_differences(qwen, store: PackStore) -> None:
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    other = make_model("qwen2", seed=1)  # same architecture, other weights
    with pytest.raises(FingerprintMismatchError, match="weights_hash"):
        load_pack(other, RadixTree(other.fingerprint), store, "kb")
    llama = make_model("llama")
    with pytest.raises(FingerprintMismatchError, match="architecture"):
        load_pack(llama, RadixTree(llama.fingerprint), store, "kb")
    # a foreign segment file dropped into this pack is caught by the per-file check too
    path = _first_segment_file(store, "kb")
    with pytest.raises(FingerprintMismatchError):
        load_segment(path, other.fingerprint)
    # the same weights with another RoPE base (a long-context override) compute other keys: refused
    rebased = make_model("qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    assert rebased.fingerprint.weights_hash == qwen.fingerprint.weights_hash
    with pytest.raises(FingerprintMismatchError, match="config_hash"):
        load_pack(rebased, RadixTree(rebased.fingerprint), store, "kb")
    # files written before the configuration was hashed name what they lack
    from kvpack_integrations.runtime.fingerprint import NOT_RECORDED, Fingerprint

    old = json.loads(qwen.fingerprint.to_json())
    del old["config_hash"]
    assert Fingerprint.from_json(json.dumps(old)).config_hash == NOT_RECORDED
    assert "config_hash: not recorded (pack)" in qwen.fingerprint.mismatches(Fingerprint.from_json(json.dumps(old)))[0]


def test_unknown_kb_invalid_name_empty_facts(qwen, store: PackStore) -> None:
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "present", FACTS)
    with pytest.raises(UnknownKnowledgeBaseError, match=r"'absent'.*known: present"):
        store.manifest("absent")
    with pytest.raises(InvalidInputError, match="invalid knowledge-base name"):
        store.manifest("../escape")
    with pytest.raises(EmptyKnowledgeError):
        build_pack(qwen, RadixTree(qwen.fingerprint), store, "empty", ["  ", ""])
    assert store.names() == ["present"]


def test_failed_rebuild_keeps_the_old_pack(qwen, store: PackStore, monkeypatch: pytest.MonkeyPatch) -> None:
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    before = store.manifest("kb").segment_ids
    import kvpack_integrations.segments.pack_store as ps

    calls = {"n": 0}
    real = ps.save_segment

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ps, "save_segment", flaky)
    with pytest.raises(OSError, match="disk full"):
        build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", [*FACTS, "A new fact."])
    monkeypatch.undo()
    assert store.manifest("kb").segment_ids == before
    load_pack(qwen, RadixTree(qwen.fingerprint), store, "kb")  # still whole
    assert [p.name for p in store.packs_dir.iterdir() if p.name != ".locks"] == ["kb"]  # no half-built directories left


def test_corrupt_manifest_is_named(qwen, store: PackStore) -> None:
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    manifest = store.pack_dir("kb") / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["segment_ids"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(CorruptSegmentError, match="manifest"):
        store.manifest("kb")


def test_half_precision_storage_is_reported_not_exact(qwen, store: PackStore) -> None:
    report = build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb16", FACTS, storage_dtype=torch.float16)
    assert not report.manifest.lossless
    full = build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb32", FACTS)
    assert report.bytes_on_disk < 0.7 * full.bytes_on_disk
    engine = Engine(qwen)
    load_pack(qwen, engine.tree, store, "kb16")
    ids = knowledge_prompt(qwen.tokenizer, FACTS, QUESTION, KnowledgeFormat()).token_ids
    result = engine.generate(ids)
    assert result.usage.cached_tokens > 0
    assert result.usage.exact is False
    assert any("float16" in note for note in result.usage.notes)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_stored_files_are_readable_as_plain_writes_would_be(qwen, store: PackStore, tmp_path: Path) -> None:
    """Temp-file writes (mkstemp 0600, mkdtemp 0700) would leave a shared store readable by its writer alone."""
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    adapter = PacketAdapter.initial(qwen, 2, 2).save(tmp_path / "adapter.safetensors")
    files, folder = 0o666 & ~_umask(), 0o777 & ~_umask()
    pack = store.pack_dir("kb")
    assert stat.S_IMODE(pack.stat().st_mode) == folder
    written = [p for p in pack.rglob("*") if p.is_file()]
    assert written and all(stat.S_IMODE(p.stat().st_mode) == files for p in written)
    assert all(stat.S_IMODE(p.stat().st_mode) == folder for p in pack.rglob("*") if p.is_dir())
    assert stat.S_IMODE(adapter.stat().st_mode) == files


def test_a_rebuild_interrupted_between_renames_gets_its_pack_back(qwen, store: PackStore) -> None:
    """Where the name cannot be swapped in one step, the old pack is renamed aside first: a crash right
    then must not lose the pack (it comes back under its name) and a leftover aside never shadows it."""
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    target = store.pack_dir("kb")
    target.rename(target.with_name(".old-kb-123"))  # what the crash leaves
    assert store.names() == ["kb"]
    assert store.manifest("kb").facts == list(FACTS)
    target.rename(target.with_name(".old-kb-456"))
    assert store.manifest("kb").facts == list(FACTS)  # a reader brings it back too
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS[:2])
    assert store.manifest("kb").facts == list(FACTS[:2])
    assert not [p.name for p in store.packs_dir.iterdir() if p.name.startswith((".old-", ".build-"))]
    store.delete("kb")
    assert store.names() == [] and not target.exists()
    # a delete takes leftover asides with it: nothing comes back under the deleted name
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    shutil.copytree(target, target.with_name(".old-kb-789"))
    store.delete("kb")
    assert store.names() == [] and not target.exists()
    # reading a name that is not there writes nothing (a read-only store stays readable)
    fresh = PackStore(store.root.parent / "fresh")
    with pytest.raises(UnknownKnowledgeBaseError):
        fresh.manifest("nosuch")
    assert not (fresh.root / "packs" / ".locks").exists()


def test_a_read_spanning_two_rebuilds_reads_one_whole_pack(qwen, store: PackStore, monkeypatch) -> None:
    """The interleaving a CI run once hit: the reader has the manifest of the full pack, a rebuild with
    fewer facts removes a segment file, and a rebuild of the full facts puts the same segment ids back
    before the reader looks again. The read must be retried, not reported as a damaged pack."""
    from kvpack_integrations.segments import pack_store

    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    first_build = store.manifest("kb").build_id
    real_load = pack_store.load_segment
    calls = []

    def load_during_rebuilds(path, *args, **kwargs):
        calls.append(path.name)
        if len(calls) == 1:  # the reader holds the full pack's manifest; a rebuild drops a fact
            build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS[:2])
        try:
            return real_load(path, *args, **kwargs)
        except CorruptSegmentError:
            if len(calls) <= len(FACTS) + 1:  # the segment is gone: the full facts come back, same ids
                build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
            raise

    monkeypatch.setattr(pack_store, "load_segment", load_during_rebuilds)
    manifest, segments = store.load_segments("kb", qwen.fingerprint)
    assert manifest.facts == list(FACTS) and manifest.build_id not in ("", first_build)
    assert [s.id for s in segments] == manifest.segment_ids
    assert len(calls) > len(manifest.segment_ids)  # the interleaving happened: a read failed and was retried

    # a pack that really is damaged is still reported as such, not retried for ever
    monkeypatch.setattr(pack_store, "load_segment", real_load)
    _first_segment_file(store, "kb").unlink()
    with pytest.raises(CorruptSegmentError, match="missing"):
        store.load_segments("kb", qwen.fingerprint)


def test_rebuilding_a_pack_while_it_is_read(qwen, store: PackStore) -> None:
    """Two builders of one name and a reader at once: every read finds a whole pack, no builder fails,
    and nothing is left behind."""
    import threading

    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    errors: list[str] = []

    def build(facts: list[str]) -> None:
        try:
            for _ in range(4):
                build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", facts)
        except Exception as exc:
            errors.append(f"build: {exc!r}")

    def read() -> None:
        try:
            for _ in range(40):
                manifest, segments = store.load_segments("kb", qwen.fingerprint)
                assert len(segments) == len(manifest.segment_ids)
        except Exception as exc:
            errors.append(f"read: {exc!r}")

    threads = [threading.Thread(target=build, args=(f,)) for f in (FACTS, FACTS[:2])] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.manifest("kb").facts in (list(FACTS), list(FACTS[:2]))
    assert not [p.name for p in store.packs_dir.iterdir() if p.name.startswith((".old-", ".build-"))]


def test_a_rebuild_is_noticed_even_with_the_same_mtime(qwen, store: PackStore) -> None:
    """`current_manifest` knew a rebuild only by the manifest's mtime: two builds within a coarse clock's
    tick (or a clock set back) served the old pack's manifest for good."""
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    path = store.pack_dir("kb") / "manifest.json"
    first = path.stat()
    assert store.current_manifest("kb").facts == list(FACTS)
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS[:2])
    os.utime(path, ns=(first.st_atime_ns, first.st_mtime_ns))
    assert store.current_manifest("kb").facts == list(FACTS[:2])


class _ExactTextEmbedder:
    """One dimension per known fact: a fact's own text is its nearest neighbour."""

    def embed(self, texts: list[str]):
        import numpy as np

        return np.array([[float(t == f) for f in FACTS] for t in texts], dtype=np.float32)


def test_facts_that_share_a_token_are_refused_by_name(qwen, store: PackStore) -> None:
    """With an empty separator 'a' and 'b' become one token: fact 'a' got no segment of its own, so every
    later fact's handle named the segment of another (PackSearcher assumed one segment per fact)."""
    from dataclasses import replace

    from kvpack_integrations.knowledge.search import PackSearcher

    with pytest.raises(InvalidInputError, match=r"fact 1 \('a'\) has no token of its own: with separator ''"):
        build_pack(
            qwen, RadixTree(qwen.fingerprint), store, "merged", ["x.", "a", "b"], fmt=KnowledgeFormat(separator="")
        )
    assert not store.exists("merged")
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    manifest = store.manifest("kb")
    searcher = PackSearcher(store, "kb", _ExactTextEmbedder())  # type: ignore[arg-type]
    assert [searcher.search(f, k=1)[0].handle.segment_id for f in FACTS] == manifest.segment_ids[1:-1]
    # a pack built before the refusal, one segment short: which segment holds a fact is unknown, not guessed
    store.write(replace(manifest, segment_ids=manifest.segment_ids[:-1]), [])
    assert [searcher.search(f, k=1)[0].handle.segment_id for f in FACTS] == ["", "", ""]


def test_a_pack_computed_under_other_numerics_is_reused_but_not_called_exact(store: PackStore) -> None:
    """The same weights under another attention kernel (or device) compute K/V that differ by rounding: a pack
    built there is reused here, reported not exact with the reason, and a pack built on top recomputes it."""
    loaded = make_model("qwen2")
    report = build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)
    assert report.manifest.computed_on == "cpu/sdpa" == store.manifest("kb").computed_on
    loaded.model.set_attn_implementation("eager")
    engine = Engine(loaded)
    load_pack(loaded, engine.tree, store, "kb")
    ids = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat()).token_ids
    usage = engine.generate(ids, GenerationSettings(max_new_tokens=3)).usage
    assert usage.cached_tokens > 0 and usage.exact is False
    assert any("computed on cpu/sdpa, reused on cpu/eager" in note for note in usage.notes)
    more = [*FACTS, "Kelmark has 14,000 people."]
    rebuilt = build_pack(loaded, engine.tree, store, "more", more)
    assert rebuilt.prefilled_tokens == rebuilt.manifest.token_count  # nothing inherited from the sdpa pack
    assert rebuilt.manifest.computed_on == "cpu/eager"
    here = Engine(loaded)
    load_pack(loaded, here.tree, store, "more")
    ids = knowledge_prompt(loaded.tokenizer, more, QUESTION, KnowledgeFormat()).token_ids
    usage = here.generate(ids, GenerationSettings(max_new_tokens=3)).usage
    assert usage.cached_tokens > 0 and usage.exact is True and not usage.notes


def test_a_pack_from_before_the_numerics_stamp_stays_exact(store: PackStore) -> None:
    loaded = make_model("qwen2")
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)
    manifest = store.pack_dir("kb") / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["computed_on"]
    manifest.write_text(json.dumps(data))
    for path in (store.pack_dir("kb") / "segments").glob("*.safetensors"):
        tensors, meta = _read_plain(path)
        del meta["computed_on"]
        save_file(tensors, str(path), metadata=meta)
    assert store.manifest("kb").computed_on == NOT_RECORDED
    engine = Engine(loaded)
    load_pack(loaded, engine.tree, store, "kb")
    ids = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat()).token_ids
    usage = engine.generate(ids, GenerationSettings(max_new_tokens=3)).usage
    assert usage.cached_tokens > 0 and usage.exact is True


def _read_plain(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
    return load_file(str(path)), metadata


def test_a_pack_built_with_reduced_fp32_matmul_precision_is_not_exact_at_full_precision(store: PackStore) -> None:
    loaded = make_model("qwen2")
    torch.set_float32_matmul_precision("medium")  # bf16 passes on a CPU that has them, TF32 on CUDA
    try:
        report = build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert report.manifest.computed_on == "cpu/sdpa/fp32-matmul-medium"
    engine = Engine(loaded)
    load_pack(loaded, engine.tree, store, "kb")
    ids = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat()).token_ids
    assert engine.generate(ids, GenerationSettings(max_new_tokens=2)).usage.exact is False


def test_k_v_recomputed_here_replace_the_foreign_ones_in_a_live_tree(store: PackStore, tmp_path: Path) -> None:
    """The tree keeps what it holds for a run of tokens: recomputed exact K/V (a pack built on top of a
    foreign one) and a rebuilt bound pack must replace it, or the engine serves the old K/V forever."""
    from kvpack_integrations.engine.chat import ChatRequest, chat
    from kvpack_integrations.knowledge.bound import BoundPack
    from kvpack_integrations.prompts.conversation import ChatTurn

    loaded = make_model("qwen2")
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)  # under sdpa
    loaded.model.set_attn_implementation("eager")
    engine = Engine(loaded)
    bound = BoundPack(store, "kb")

    def ask() -> object:
        request = ChatRequest(turns=[ChatTurn("user", QUESTION)], pack=bound, settings=GenerationSettings(2))
        return chat(engine, request).usage

    assert ask().exact is False  # type: ignore[attr-defined]
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)  # rebuilt here, in another tree
    after = ask()
    assert after.exact is True and any("loaded from" in n for n in after.notes)  # type: ignore[attr-defined]
    # materialize on top of foreign K/V: the engine's own tree then serves the recomputed ones
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "sdpa", FACTS[:2])
    other = Engine(loaded)
    loaded.model.set_attn_implementation("sdpa")
    load_pack(loaded, other.tree, store, "kb")  # eager K/V, foreign under sdpa
    build_pack(loaded, other.tree, store, "more", [*FACTS, "Kelmark has 14,000 people."])
    ids = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat()).token_ids
    assert other.generate(ids, GenerationSettings(max_new_tokens=2)).usage.exact is True


def test_pack_names_and_leftovers(store: PackStore) -> None:
    """A name with a final newline is refused; folders of killed builds and deletes are swept at the next
    write of that name (a build folder still being written is not); a pack a crash left renamed aside
    comes back for `exists` as for `names`."""
    from kvpack_integrations.errors import InvalidInputError

    loaded = make_model("qwen2")
    with pytest.raises(InvalidInputError):
        build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb\n", FACTS)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)
    packs = store.packs_dir
    killed, live, deleting, other = (
        packs / ".build-kb-abcd1234",
        packs / ".build-kb-live0000",
        packs / ".deleting-kb-123",
        packs / ".build-kb2-abcd1234",
    )
    for folder in (killed, live, deleting, other):
        (folder / "segments").mkdir(parents=True)
    for path in (killed, killed / "segments", other, other / "segments"):
        os.utime(path, (1, 1))
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)
    assert not killed.exists() and not deleting.exists()
    assert live.exists() and other.exists()  # a build under way, another pack's leftover
    (packs / "kb").rename(packs / ".old-kb-123")
    assert store.exists("kb") and (packs / "kb" / "manifest.json").is_file()


def test_an_unsearchable_pack_folder_does_not_hide_the_others(
    store: PackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = make_model("qwen2")
    for name in ("a", "b"):
        build_pack(loaded, RadixTree(loaded.fingerprint), store, name, FACTS)
    real_is_file, real_read_text = Path.is_file, Path.read_text

    def denied(self: Path) -> None:
        if self.parent.name == "b":  # b's folder lost its search permission (mode 000)
            raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", lambda self: denied(self) or real_is_file(self))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: denied(self) or real_read_text(self, *a, **k))
    assert store.names() == ["a", "b"] and store.exists("b")
    with pytest.raises(CorruptSegmentError, match="unreadable"):
        store.manifest("b")


def test_storage_wider_than_the_model_dtype_stays_exact(store: PackStore) -> None:
    base = make_model("qwen2")
    loaded = wrap_model(base.model.to(torch.bfloat16), base.tokenizer, name="tiny-qwen2-bf16")
    report = build_pack(loaded, RadixTree(loaded.fingerprint), store, "wide", FACTS, storage_dtype=torch.float32)
    assert report.manifest.lossless and report.manifest.storage_dtype == "float32"
    engine = Engine(loaded)
    load_pack(loaded, engine.tree, store, "wide")
    ids = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat()).token_ids
    assert engine.generate(ids, GenerationSettings(max_new_tokens=2)).usage.exact is True


def test_a_pack_reaches_the_disk_before_the_rename_publishes_it(
    qwen, store: PackStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = record_fsyncs_and_renames(monkeypatch)
    build_pack(qwen, RadixTree(qwen.fingerprint), store, "durable", FACTS)
    staged, synced, published = synced_before_publishing(events, ".build-durable-")
    target = store.pack_dir("durable")
    entries = [p.relative_to(target) for p in target.rglob("*")]
    assert "manifest.json" in {str(e) for e in entries} and len(entries) > 2
    # every file and folder (whose entries a power cut could otherwise lose) is on disk before it is published
    assert {str(staged / e) for e in entries} | {str(staged)} <= synced
    assert ("fsync", str(store.packs_dir)) in events[published:]  # and the rename itself after it


def test_a_search_meeting_a_rebuild_names_the_segments_of_the_facts_it_ranked(qwen, store: PackStore) -> None:
    """A search that had ranked one build's facts read the segment ids the searcher held when it built the
    handles: a concurrent search that re-indexed a rebuild in between gave the old facts the new ids."""
    from kvpack_integrations.knowledge.search import PackSearcher

    build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", FACTS)
    before = store.manifest("kb").segment_ids[1:-1]
    embedder = _ExactTextEmbedder()
    searcher = PackSearcher(store, "kb", embedder)  # type: ignore[arg-type]
    searcher.search(FACTS[0], k=1)  # indexed

    class Interleaved(_ExactTextEmbedder):
        def embed(self, texts: list[str]) -> Any:
            if texts == [FACTS[1]]:  # the query of the first search: another search indexes a rebuild now
                searcher.embedder = embedder
                build_pack(qwen, RadixTree(qwen.fingerprint), store, "kb", [FACTS[1], FACTS[0], FACTS[2]])
                searcher.search(FACTS[0], k=1)
            return super().embed(texts)

    searcher.embedder = Interleaved()  # type: ignore[assignment]
    hit = searcher.search(FACTS[1], k=1)[0]
    assert hit.text == FACTS[1] and hit.handle.segment_id == before[1]  # the first build's fact, its segment
