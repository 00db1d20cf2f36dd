"""The Chroma-backed knowledge base: banked routing, persistence, incremental adds, servers, bad input."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import chromadb
import pytest
from chromadb.config import Settings

from kvpack_integrations.errors import (
    EmptyKnowledgeError,
    InvalidInputError,
    KnowledgeBaseUnavailableError,
    UnknownKnowledgeBaseError,
)
from kvpack_integrations.knowledge.knowledge_base import FORMAT, KnowledgeBase
from kvpack_integrations.knowledge.synthetic import synthetic_facts

ROWS = list(synthetic_facts(120, seed=1))
FACTS = [r["fact"] for r in ROWS]


@pytest.fixture
def kb(tmp_path: Path) -> KnowledgeBase:
    base = KnowledgeBase("syn", tmp_path / "kb")
    base.add(FACTS, ids=[f"f{i}" for i in range(len(FACTS))], progress=False)
    return base


def test_banks_and_routing(kb: KnowledgeBase) -> None:
    assert len(kb) == 120 and kb.n_banks == 6  # ceil(120 / 20)
    # k-means puts every fact in its nearest centroid's bank, so a fact routes to itself with one probe
    for i in range(0, 120, 7):
        hit = kb.route(FACTS[i], k=1, probes=1)[0]
        assert hit.id == f"f{i}" and hit.text == FACTS[i] and hit.score > 0.99
    # probing every bank is flat search: the best hit is the globally most similar fact
    question = ROWS[3]["question"]
    everything = kb.route(question, k=5, probes=kb.n_banks)
    assert [h.score for h in everything] == sorted((h.score for h in everything), reverse=True)
    assert kb.route(question, k=1, probes=1)[0].score <= everything[0].score
    assert kb.facts() == FACTS


def test_incremental_add_and_rebalance(kb: KnowledgeBase) -> None:
    kb.add(["Zorblax Labs makes flutes."], ids=["new"], metadatas=[{"source": "test"}], progress=False)
    hit = kb.route("Zorblax Labs makes flutes.", k=1, probes=1)[0]
    assert hit.id == "new" and hit.metadata == {"source": "test"}
    assert kb.n_banks == 6  # joined the nearest bank; centroids unchanged until a rebalance
    assert kb.rebalance() == 7 and kb.n_banks == 7
    assert kb.rebalance(3) == 3
    assert kb.route(FACTS[0], k=1, probes=1)[0].id == "f0"


def test_hybrid_routing_separates_facts_that_embed_alike(kb: KnowledgeBase) -> None:
    # synthetic facts share six templates and differ in invented names, which MiniLM embeds alike:
    # the paper's dense-only routing confuses them, BM25's rare-name weight does not
    def accuracy(weight: float) -> float:
        hits = [kb.route(r["question"], k=1, probes=1, lexical_weight=weight)[0].id for r in ROWS]
        return sum(h == f"f{i}" for i, h in enumerate(hits)) / len(ROWS)

    dense, hybrid = accuracy(0.0), accuracy(1.0)
    assert dense < hybrid == 1.0, (dense, hybrid)
    top = kb.route(ROWS[0]["question"], k=3)
    assert top[0].score == pytest.approx(top[0].similarity + 1.0)  # the best BM25 row scores 1 relative
    with pytest.raises(InvalidInputError, match="lexical_weight"):
        kb.route("x", lexical_weight=-1.0)


def test_other_writers_are_seen_by_a_reader(kb: KnowledgeBase, tmp_path: Path) -> None:
    reader = KnowledgeBase("syn", tmp_path / "kb", create=False)
    assert reader.route(ROWS[2]["question"], k=1)[0].id == "f2"  # the reader's mirror is built here
    writer = KnowledgeBase("syn", tmp_path / "kb", create=False)
    writer.add(["Quibblex Foundry makes harps."], ids=["late"], progress=False)
    assert reader.route("What does Quibblex Foundry make?", k=1)[0].id == "late"  # appended
    writer.rebalance(2)
    assert reader.n_banks == 2 and {f.bank for f in reader.route(FACTS[3], k=10, probes=2)} <= {0, 1}  # reloaded


def test_reduced_routing_vectors(tmp_path: Path) -> None:
    full = KnowledgeBase("full", tmp_path / "full")
    full.add(FACTS, ids=[f"f{i}" for i in range(len(FACTS))], progress=False)
    small = KnowledgeBase("small", tmp_path / "small", dims=32)
    with pytest.raises(InvalidInputError, match=r"needs at least 32 facts in its first add.*\(384: full vectors\)"):
        small.add(FACTS[:10], progress=False)
    assert len(small) == 0  # nothing stored by the refused add
    # still empty, the base takes other dims asked for explicitly (the failed ones do not stick to the
    # name); a plain or read-only open changes nothing
    assert KnowledgeBase("small", tmp_path / "small").routing_dim == 32
    assert KnowledgeBase("small", tmp_path / "small", create=False).routing_dim == 32
    assert KnowledgeBase("small", tmp_path / "small", dims=full.routing_dim).routing_dim == full.routing_dim
    small = KnowledgeBase("small", tmp_path / "small", dims=32)
    small.add(FACTS, ids=[f"f{i}" for i in range(len(FACTS))], progress=False)
    assert small.disk_bytes() < full.disk_bytes()
    again = KnowledgeBase("small", tmp_path / "small", create=False)  # the PCA is read back from Chroma
    assert again.routing_dim == 32 and all(again.route(r["question"], k=1)[0].id == f"f{i}" for i, r in enumerate(ROWS))
    with pytest.raises(InvalidInputError, match="stores 32-dim routing vectors"):
        KnowledgeBase("small", tmp_path / "small", dims=64)
    with pytest.raises(InvalidInputError, match="dims must be an integer from 1"):
        KnowledgeBase("big", tmp_path / "small", dims=10_000)


def test_persistence_across_processes(kb: KnowledgeBase, tmp_path: Path) -> None:
    code = (
        "from kvpack_integrations.knowledge.knowledge_base import KnowledgeBase;"
        f"kb = KnowledgeBase('syn', {str(tmp_path / 'kb')!r}, create=False);"
        f"print(len(kb), kb.n_banks, kb.route({FACTS[5]!r}, k=1)[0].id)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["120", "6", "f5"]


def test_bad_input(kb: KnowledgeBase, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="already in knowledge base 'syn': \\['f1'\\]"):
        kb.add(["another fact"], ids=["f1"], progress=False)
    with pytest.raises(InvalidInputError, match="duplicate fact ids in this batch"):
        kb.add(["a", "b"], ids=["x", "x"], progress=False)
    with pytest.raises(InvalidInputError, match="reserved"):
        kb.add(["a"], metadatas=[{"bank": 3}], progress=False)
    with pytest.raises(EmptyKnowledgeError):
        kb.add([], progress=False)
    with pytest.raises(InvalidInputError, match="query is empty"):
        kb.route(" ")
    assert len(kb) == 120  # nothing stored by the refused calls
    empty = KnowledgeBase("empty", tmp_path / "kb")
    with pytest.raises(EmptyKnowledgeError, match="holds no facts"):
        empty.route("anything")
    with pytest.raises(UnknownKnowledgeBaseError, match="no knowledge base named 'nope'"):
        KnowledgeBase("nope", tmp_path / "kb", create=False)
    for name in ("a b", "_kb", "kb-", "café"):  # Chroma refuses these: caught before it is asked
        with pytest.raises(InvalidInputError, match="invalid knowledge-base name"):
            KnowledgeBase(name, tmp_path / "kb")


@pytest.mark.filterwarnings("ignore:Number of distinct clusters:sklearn.exceptions.ConvergenceWarning")
def test_routing_reads_past_empty_banks(tmp_path: Path) -> None:
    """Fewer distinct facts than banks: k-means leaves banks empty, and a query nearest to one still gets
    the facts of the nearest bank that has any (it crashed Chroma with an empty id list)."""
    base = KnowledgeBase("dupes", tmp_path / "kb", bank_size=1)
    base.add(["Same fact."] * 3 + ["Other thing entirely."], ids=["a", "b", "c", "d"], progress=False)
    assert base.n_banks == 4
    for query in ("Same fact.", "fact", "Other thing entirely.", "unrelated words"):
        hits = base.route(query, k=1, lexical_weight=0)
        assert len(hits) == 1
    assert base.route("Other thing entirely.", k=1, lexical_weight=0)[0].id == "d"


def test_another_embedder_is_refused(tmp_path: Path) -> None:
    client = chromadb.PersistentClient(path=str(tmp_path / "kb"), settings=Settings(anonymized_telemetry=False))
    client.create_collection(
        "bge-facts", metadata={"format": FORMAT, "embedder": "BAAI/bge-large-en-v1.5", "dim": 1024, "bank_size": 20}
    )
    del client
    with pytest.raises(InvalidInputError, match=r"built with embedder 'BAAI/bge-large-en-v1\.5' \(1024 dims\)"):
        KnowledgeBase("bge", tmp_path / "kb")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dead_server_is_a_clear_error() -> None:
    with pytest.raises(KnowledgeBaseUnavailableError, match=r"cannot reach a Chroma server at 127\.0\.0\.1:\d+"):
        KnowledgeBase("syn", host="127.0.0.1", port=_free_port())


@pytest.fixture
def chroma_server(tmp_path: Path):
    """A real `chroma run` on localhost, stopped after the test."""
    exe = shutil.which("chroma") or str(Path(sys.executable).with_name("chroma"))
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "run", "--path", str(tmp_path / "server"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                chromadb.HttpClient(host="127.0.0.1", port=port).heartbeat()
                break
            except Exception:
                time.sleep(0.5)
        else:
            raise RuntimeError("chroma run did not start within 60 s")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_real_chroma_server_shared_by_two_clients(chroma_server: int) -> None:
    writer = KnowledgeBase("shared", host="127.0.0.1", port=chroma_server)
    writer.add(FACTS[:40], ids=[f"f{i}" for i in range(40)], progress=False)
    reader = KnowledgeBase("shared", host="127.0.0.1", port=chroma_server, create=False)
    assert len(reader) == 40 and reader.n_banks == 2
    assert reader.route(FACTS[7], k=1)[0].id == "f7"
    assert reader.disk_bytes() == 0  # the server's files are not ours to count


def test_langchain_retriever_reads_the_knowledge_base(kb: KnowledgeBase, tmp_path: Path) -> None:
    from kvpack_integrations.langchain import KVPackRetriever
    from kvpack_integrations.langchain.retriever import FACT_KEY

    retriever = KVPackRetriever(kb="syn", backend="chroma", chroma_path=str(tmp_path / "kb"), k=2, probes=6)
    docs = retriever.invoke(FACTS[9])
    assert docs[0].page_content == FACTS[9] and docs[0].metadata[FACT_KEY]["id"] == "f9"
    assert len(retriever.invoke(FACTS[9], k=3)) == 3
    with pytest.raises(UnknownKnowledgeBaseError):
        KVPackRetriever(kb="missing", backend="chroma", chroma_path=str(tmp_path / "kb"))


def test_an_add_cut_short_leaves_a_base_the_next_add_completes(tmp_path: Path, monkeypatch) -> None:
    """Metadata Chroma would refuse is caught before any batch is written; a first add interrupted after
    a batch (Ctrl-C, a dead server) leaves its facts counted, and the next add clusters them all."""
    base = KnowledgeBase("cut", tmp_path / "kb", bank_size=2)
    facts = FACTS[:6]
    with pytest.raises(InvalidInputError, match="metadata of fact 3: values of \\['src'\\]"):
        base.add(facts[:4], metadatas=[{}, {}, {}, {"src": {"nested": 1}}], batch_size=2, progress=False)
    assert len(base) == 0
    real = base._facts.add
    calls = {"n": 0}

    def dies_on_the_second_batch(**kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(**kwargs)

    monkeypatch.setattr(base._facts, "add", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        base.add(facts[:4], ids=["a", "b", "c", "d"], batch_size=2, progress=False)
    monkeypatch.undo()
    assert len(base) == 2 and base.n_banks == 0
    base.add(facts[2:], ids=["c", "d", "e", "f"], batch_size=2, progress=False)
    assert len(base) == 6 and base.n_banks == 3 and base.facts() == facts  # insertion order kept
    assert base.route(facts[4], k=1)[0].id == "e"


def test_eval_routing_checks_a_reused_base_by_its_label(tmp_path: Path, monkeypatch) -> None:
    """`eval routing` reuses a base only if it holds the file's facts: a labelled base answers that from
    its label, without reading every fact; an unlabelled one (built before labels) is compared once and
    labelled; a base of another file is refused whichever way it is known."""
    from kvpack_integrations.evaluation.routing import RoutingRow, run_routing

    rows = [RoutingRow(r["fact"], r["question"], r["answer"]) for r in synthetic_facts(12, seed=3)]
    kb = KnowledgeBase("labels", tmp_path / "kb", bank_size=4)
    run_routing(None, rows, kb, answers=False, limit=2)
    assert kb.label("facts_sha256") is not None and kb.label("missing") is None

    def no_full_read() -> list[str]:
        raise AssertionError("a labelled base was read fact by fact")

    monkeypatch.setattr(kb, "facts", no_full_read)
    assert run_routing(None, rows, kb, answers=False, limit=2)["n_facts"] == 12
    other = [RoutingRow(r.fact + " Indeed.", r.question, r.answer) for r in rows]
    with pytest.raises(InvalidInputError, match="holds other facts than the file"):
        run_routing(None, other, kb, answers=False)
    monkeypatch.undo()
    kb.set_label("facts_sha256", "")  # as a base built before labels reads: no label
    monkeypatch.setattr(KnowledgeBase, "label", lambda self, key: None)
    with pytest.raises(InvalidInputError, match="holds other facts than the file"):
        run_routing(None, other, kb, answers=False)  # compared fact by fact
    run_routing(None, rows, kb, answers=False, limit=2)
    monkeypatch.undo()
    assert kb.label("facts_sha256") not in (None, "")  # labelled by the comparison that passed
    with pytest.raises(InvalidInputError, match="identifier"):
        kb.set_label("not a key", "x")


def test_what_chroma_refuses_is_refused_before_any_batch_is_written(tmp_path: Path) -> None:
    """An empty id or a metadata key Chroma refuses, in a later batch, used to fail after earlier batches
    were stored: a base with facts but no banks, and a corrected retry refused as duplicate ids."""
    base = KnowledgeBase("refused", tmp_path / "kb", bank_size=2)
    facts, ids = FACTS[:4], ["a", "b", "c", "d"]
    for bad_ids, metas, message in (
        (["a", "b", "c", ""], None, r"fact ids at positions \[3\] are empty"),
        (ids, [{}, {}, {}, {"$src": "x"}], r"metadata of fact 3: keys \['\$src'\] are not allowed"),
        (ids, [{}, {}, {}, {"#document": "x"}], r"metadata of fact 3: keys \['#document'\] are not allowed"),
        (ids, [{}, {}, {}, {"": 1}], r"metadata of fact 3: keys \[''\] are not allowed"),
        (ids, [{}, {}, {}, "src"], r"metadata of fact 3 is not a mapping"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            base.add(facts, ids=bad_ids, metadatas=metas, batch_size=2, progress=False)
        assert len(base) == 0
    base.add(facts, ids=ids, metadatas=[{}, {}, {}, {"src": "x"}], batch_size=2, progress=False)  # the retry
    assert len(base) == 4 and base.n_banks == 2


def test_one_string_is_not_taken_for_a_list_of_facts(tmp_path: Path) -> None:
    """A string is a sequence of characters: add('Paris') stored five one-letter facts."""
    from kvpack_integrations.knowledge.facts import clean_facts

    base = KnowledgeBase("strings", tmp_path / "kb")
    with pytest.raises(InvalidInputError, match="facts must be a list of strings, got one string: 'Paris'"):
        base.add("Paris", progress=False)
    with pytest.raises(InvalidInputError, match="ids must be a list of strings, got one string"):
        base.add(["Paris is in France.", "Rome is in Italy."], ids="ab", progress=False)
    with pytest.raises(InvalidInputError, match="metadatas must be a list of mappings"):
        base.add(["Paris is in France."], metadatas={"src": "x"}, progress=False)
    assert len(base) == 0
    for one in ("Paris", b"Paris"):
        with pytest.raises(InvalidInputError, match="facts must be a list of strings, got one string"):
            clean_facts(one)  # type: ignore[arg-type]


def _routes(base: KnowledgeBase) -> list[tuple[str, int]]:
    """Dense-only routing (no BM25 to cover for wrong banks) of every third fact: (top id, its bank)."""
    return [(h.id, h.bank) for f in FACTS[::3] for h in base.route(f, k=1, probes=1, lexical_weight=0)]


def test_an_interrupted_rebalance_leaves_routing_as_it_was(kb: KnowledgeBase, tmp_path: Path, monkeypatch) -> None:
    """A rebalance cut after its centroids were written, or halfway through relabelling the facts, used to
    leave readers routing with new centroids over old banks, for good (dense self-routing 0.22 vs 1.0)."""
    from kvpack_integrations.knowledge import knowledge_base

    reader = KnowledgeBase("syn", tmp_path / "kb", create=False)
    before = _routes(reader)
    assert [i for i, _ in before] == [f"f{i}" for i in range(0, 120, 3)]
    monkeypatch.setattr(knowledge_base, "_PAGE", 50)  # 120 facts relabelled in three pages
    real_update = kb._facts.update
    for pages_written in (0, 1):  # cut after the new centroids; cut after one page of new labels
        calls = {"n": 0}

        def update(*args, _written=pages_written, _calls=calls, **kwargs):
            _calls["n"] += 1
            if _calls["n"] > _written:
                raise KeyboardInterrupt
            return real_update(*args, **kwargs)

        monkeypatch.setattr(kb._facts, "update", update)
        with pytest.raises(KeyboardInterrupt):
            kb.rebalance(12, progress=False)
        monkeypatch.setattr(kb._facts, "update", real_update)
        assert kb.n_banks == 6 and len(kb) == 120
        assert _routes(reader) == before  # the reader's mirror, and a fresh process's, route as before
        assert _routes(KnowledgeBase("syn", tmp_path / "kb", create=False)) == before
    # cut after the stamp, before the old centroids leave: the new banks are whole and in use
    real_delete = kb._banks.delete

    def delete_only_an_attempt(*args, where=None, **kwargs):
        if where != {"generation": 2}:  # 2: the generation this rebalance writes
            raise KeyboardInterrupt
        return real_delete(*args, where=where, **kwargs)

    monkeypatch.setattr(kb._banks, "delete", delete_only_an_attempt)
    with pytest.raises(KeyboardInterrupt):
        kb.rebalance(12, progress=False)
    monkeypatch.undo()
    assert kb.n_banks == 12 and kb._banks.count() == 18  # the old generation's 6 are left over, unused
    assert [i for i, _ in _routes(reader)] == [i for i, _ in before]
    assert kb.rebalance(12, progress=False) == 12 and kb._banks.count() == 12  # a rerun cleans up
    after = _routes(KnowledgeBase("syn", tmp_path / "kb", create=False))
    assert [i for i, _ in after] == [i for i, _ in before] and _routes(reader) == after
    assert kb.route(FACTS[0], k=1)[0].metadata == {}  # the label fields stay hidden


def _as_built_before_generations(base: KnowledgeBase) -> None:
    """Rewrite a base into the layout kvpack wrote before bank generations: centroids `bank-{b}` without
    a generation, each fact's bank in `bank`, no layout stamp."""
    from kvpack_integrations.knowledge.bank_layout import BankLayout

    meta = base._metadata()
    field = BankLayout.of(meta).field
    centroids = base._banks.get(include=["embeddings", "metadatas"])
    base._banks.delete(ids=centroids["ids"])
    base._banks.add(
        ids=[f"bank-{m['bank']}" for m in centroids["metadatas"]],
        embeddings=[list(e) for e in centroids["embeddings"]],
        metadatas=[{"bank": m["bank"], "size": m["size"]} for m in centroids["metadatas"]],
    )
    facts = base._facts.get(include=["metadatas"])
    base._facts.update(
        ids=facts["ids"], metadatas=[{"bank": m[field], "kvpack_bank": None} for m in facts["metadatas"]]
    )
    base._facts.modify(
        metadata={k: v for k, v in meta.items() if not k.startswith("hnsw:") and k != "kvpack_bank_field"}
    )


def test_a_base_built_before_bank_generations_still_routes_and_moves_over(
    kb: KnowledgeBase, tmp_path: Path, monkeypatch
) -> None:
    before = _routes(kb)
    _as_built_before_generations(kb)
    old = KnowledgeBase("syn", tmp_path / "kb", create=False)
    assert old.n_banks == 6 and _routes(old) == before
    monkeypatch.setattr(kb._facts, "update", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # a first rebalance cut short: the old layout still routes
        kb.rebalance(12, progress=False)
    monkeypatch.undo()
    assert old.n_banks == 6 and _routes(old) == before
    kb.add(["Zorblax Labs makes flutes."], ids=["late"], progress=False)  # joins an old-layout bank
    assert old.route("Zorblax Labs makes flutes.", k=1, lexical_weight=0)[0].id == "late"
    assert kb.rebalance(12, progress=False) == 12 and kb._banks.count() == 12  # moved over, old centroids gone
    assert all(i.startswith("g") for i in kb._banks.get(include=[])["ids"])
    assert [i for i, _ in _routes(old)] == [i for i, _ in before]


def test_a_base_whose_clustering_was_cut_short_is_searched_flat(tmp_path: Path, monkeypatch) -> None:
    """Facts stored, k-means cut short (Ctrl-C): route() asked Chroma for 0 centroids and failed with a
    raw TypeError. It searches every fact instead, until the base is clustered."""
    base = KnowledgeBase("unbanked", tmp_path / "kb")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(base, "rebalance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        base.add(FACTS, ids=[f"f{i}" for i in range(len(FACTS))], progress=False)
    monkeypatch.undo()
    assert len(base) == 120 and base.n_banks == 0
    reader = KnowledgeBase("unbanked", tmp_path / "kb", create=False)
    for i in (0, 41, 119):
        hit = reader.route(FACTS[i], k=1, lexical_weight=0)[0]
        assert hit.id == f"f{i}" and hit.bank == -1
    assert [h.id for h in reader.route(ROWS[7]["question"], k=1)] == ["f7"]
    assert base.rebalance(progress=False) == 6
    hit = reader.route(FACTS[41], k=1, lexical_weight=0)[0]
    assert hit.id == "f41" and hit.bank >= 0


def test_an_add_cut_before_its_stamp_keeps_order_and_readers_cheap(
    kb: KnowledgeBase, tmp_path: Path, monkeypatch
) -> None:
    """An add cut between Chroma's write and its stamp: the next add took the same insertion order, and
    readers rebuilt their whole mirror on every query (the stamped size stayed below the mirror's)."""
    reader = KnowledgeBase("syn", tmp_path / "kb", create=False)
    reader.warm()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kb, "_stamp", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kb.add(["Zorblax Labs makes flutes."], ids=["z1"], progress=False)
    monkeypatch.undo()
    kb.add(["Quibblex Foundry makes harps."], ids=["z2"], progress=False)
    got = kb._facts.get(ids=["z1", "z2"], include=["metadatas"])
    assert sorted(m["kvpack_order"] for m in got["metadatas"]) == [120, 121]
    assert kb.facts()[-2:] == ["Zorblax Labs makes flutes.", "Quibblex Foundry makes harps."]
    rebuilds = []
    real = KnowledgeBase._mirror_pages

    def counted(self, mirror, where):
        rebuilds.append(where is None)
        return real(self, mirror, where)

    monkeypatch.setattr(KnowledgeBase, "_mirror_pages", counted)
    for _ in range(3):
        assert reader.route("What does Quibblex Foundry make?", k=1)[0].id == "z2"
    assert reader.route("What does Zorblax Labs make?", k=1)[0].id == "z1"
    assert True not in rebuilds
