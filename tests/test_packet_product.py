"""KV Packet in the product: `strategy="packet"`/`"blend"` in the engine, KVPackChatModel and the retriever,
packets stored at index time and reused, approximate usage reports, and refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvpack_integrations import build_pack, load_model, wrap_model
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.composition.cache_ops import empty_cache, forward
from kvpack_integrations.composition.rope import rope_spec
from kvpack_integrations.engine.chat import ChatRequest, chat
from kvpack_integrations.engine.engine import Engine
from kvpack_integrations.engine.settings import GenerationSettings
from kvpack_integrations.errors import InvalidInputError
from kvpack_integrations.langchain import KVPackChatModel, KVPackRetriever
from kvpack_integrations.langchain.retriever import PACKET_KEY
from kvpack_integrations.packet import PacketAdapter
from kvpack_integrations.packet.compose import cache_packet, compose_packets
from kvpack_integrations.packet.composer import PacketComposer
from kvpack_integrations.packet.layout import PacketPrompt, packet_prompt
from kvpack_integrations.packet.store import iter_packets, load_packet, packet_path, save_packet
from kvpack_integrations.prompts.conversation import ChatTurn, render_conversation
from kvpack_integrations.prompts.knowledge import KnowledgeFormat

from .conftest import FACTS, QUESTION
from .support.tiny_models import save_model_dir

SETTINGS = GenerationSettings(max_new_tokens=6)


def _request(**kwargs) -> ChatRequest:
    return ChatRequest(turns=[ChatTurn("user", QUESTION)], knowledge=FACTS, settings=SETTINGS, **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_packet_strategy_composes_stored_packets(tmp_path, family: str) -> None:
    from .support.tiny_models import make_model

    loaded = make_model(family)
    adapter = PacketAdapter.initial(loaded, 2, 3)
    composer = PacketComposer(loaded, tmp_path / "packets", adapter)
    engine = Engine(loaded, packets=composer)
    # the conversation is cut where the knowledge prompt puts the documents, token for token
    rendered = render_conversation(loaded.tokenizer, [ChatTurn("user", QUESTION)], knowledge=FACTS)
    split = PacketPrompt.from_cuts(rendered.token_ids, rendered.knowledge_cuts)
    assert split == packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat())
    # the composer's cache is the preamble plus hand-composed packets
    preamble = empty_cache(loaded)
    forward(loaded, preamble, split.preamble)
    by_hand = compose_packets(
        loaded, preamble, [cache_packet(loaded, adapter, d) for d in split.documents], rope_spec(loaded)
    )
    composition = composer.compose(engine, split, "packet")
    assert composition.packets_built == 3 and composition.recomputed_tokens == 0
    torch.testing.assert_close(
        forward(loaded, composition.composed.cache, split.tail), forward(loaded, by_hand, split.tail)
    )
    # a chat request with strategy="packet" answers from that composition, from the store now
    want = engine.generate(list(split.tail), SETTINGS, composed=composer.compose(engine, split, "packet").composed)
    reply = chat(engine, _request(strategy="packet"))
    assert reply.text == want.text
    u = reply.usage
    assert u.strategy == "packet" and u.exact is False
    # the usage counts prompt tokens; the adapter's 2 + 3 soft tokens per document are reported apart
    assert u.cached_tokens == len(split.preamble) + sum(len(d) for d in split.documents)
    assert u.prefilled_tokens == len(split.tail) and u.input_tokens == len(split.text_ids())
    assert u.soft_tokens == 5 * len(split.documents)
    note = next(n for n in u.notes if n.startswith("approximate"))
    assert "3 documents" in note and "nothing recomputed" in note and "cached now" not in note
    assert len(list((tmp_path / "packets").rglob("*.safetensors"))) == 3  # one per document, reused


def test_blend_recomputes_a_share_and_refusals(tmp_path) -> None:
    from .support.tiny_models import make_model

    loaded = make_model("llama")
    engine = Engine(loaded, packets=PacketComposer(loaded, tmp_path / "p", None, blend_ratio=0.2))
    reply = chat(engine, _request(strategy="blend"))
    note = next(n for n in reply.usage.notes if n.startswith("approximate"))
    assert "CacheBlend" in note and "cached now and stored" in note and reply.usage.exact is False
    with pytest.raises(InvalidInputError, match="no packet adapter"):
        chat(engine, _request(strategy="packet"))
    with pytest.raises(InvalidInputError, match="has none"):
        chat(engine, ChatRequest(turns=[ChatTurn("user", QUESTION)], strategy="blend", settings=SETTINGS))
    with pytest.raises(InvalidInputError, match="has none"):
        chat(engine, _request(strategy="blend", knowledge_format=KnowledgeFormat(instruction="")))
    with pytest.raises(InvalidInputError, match="non-empty instruction"):
        packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat(instruction=""))
    with pytest.raises(InvalidInputError, match="unknown strategy"):
        chat(engine, _request(strategy="packets"))
    with pytest.raises(InvalidInputError, match="blend_ratio"):
        PacketComposer(loaded, tmp_path, None, blend_ratio=0)
    with pytest.raises(InvalidInputError, match="do not split"):
        PacketPrompt.from_cuts([1, 2, 3], [2, 1])


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_blend_on_every_family_fused_qkv_included(tmp_path, family: str) -> None:
    """Blend's selection reads layer-1 values; Phi-3 projects Q, K and V in one `qkv_proj` (no `v_proj`),
    which failed with a raw AttributeError. The values read must be those of a full forward's cache."""
    from kvpack_integrations.packet.recompute import layer_values

    from .support.tiny_models import make_model

    loaded = make_model(family)
    ids = loaded.tokenizer(FACTS[0], add_special_tokens=False)["input_ids"]
    full = empty_cache(loaded)
    forward(loaded, full, ids)
    torch.testing.assert_close(layer_values(loaded, ids), full.layers[1].values[0])
    engine = Engine(loaded, packets=PacketComposer(loaded, tmp_path / "p", None, blend_ratio=0.2))
    reply = chat(engine, _request(strategy="blend"))
    assert "CacheBlend" in next(n for n in reply.usage.notes if n.startswith("approximate"))
    assert reply.usage.strategy == "blend" and reply.usage.exact is False


def _model_and_pack(tmp_path, store) -> tuple[str, object, str]:
    """A tiny Llama saved as a model directory, the pack `energy` of FACTS, and a packet store path."""
    path = save_model_dir("llama", tmp_path / "models")
    loaded = load_model(path)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "energy", FACTS)
    return path, loaded, str(tmp_path / "packets")


def _retriever(store, path: str, packets: str, **options) -> KVPackRetriever:
    return KVPackRetriever(kb="energy", store=str(store.root), k=2, model=path, packet_store=packets, **options)


def test_chat_model_and_retriever_with_packets(tmp_path, store) -> None:
    path, loaded, packets = _model_and_pack(tmp_path, store)
    adapter_file = PacketAdapter.initial(loaded, 2, 2).save(tmp_path / "adapter.safetensors")
    retriever = _retriever(store, path, packets, composition="packet", packet_adapter=str(adapter_file))
    docs = retriever.invoke("Who makes the Tessel-9 battery?")
    assert docs[0].metadata[PACKET_KEY]["composition"] == "packet" and docs[0].metadata[PACKET_KEY]["built_now"]
    assert len(list((tmp_path / "packets").rglob("*.safetensors"))) == 2  # packets made at retrieval
    model = KVPackChatModel(
        model=path, max_tokens=6, strategy="packet", packet_store=packets, packet_adapter=str(adapter_file)
    )
    answer = model.invoke(QUESTION, documents=docs)
    meta = answer.response_metadata["kvpack"]
    assert meta["strategy"] == "packet" and meta["exact"] is False
    assert any("nothing recomputed" in n for n in meta["notes"]) and not any("cached now" in n for n in meta["notes"])
    exact = KVPackChatModel(model=path, max_tokens=6).invoke(QUESTION, documents=docs)
    assert exact.response_metadata["kvpack"]["exact"] is True
    again = retriever.invoke("Who makes the Tessel-9 battery?")
    assert not again[0].metadata[PACKET_KEY]["built_now"]


def test_resident_packets_skip_the_store_and_stay_in_budget(tmp_path) -> None:
    from kvpack_integrations.packet.resident import ResidentPackets, packet_bytes
    from kvpack_integrations.packet.store import packet_path

    from .support.tiny_models import make_model

    loaded = make_model("llama")
    adapter = PacketAdapter.initial(loaded, 2, 2)
    split = packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat())
    sizes = [packet_bytes(cache_packet(loaded, adapter, d)) for d in split.documents]
    composer = PacketComposer(loaded, tmp_path / "p", adapter, resident_bytes=sum(sizes))
    engine = Engine(loaded, packets=composer)
    first = composer.compose(engine, split, "packet")
    assert first.packets_built == 3 and len(composer.resident) == 3
    for document in split.documents:  # the store is gone: a repeat is served from device memory
        packet_path(composer.store, document, adapter, loaded.fingerprint).unlink()
    again = composer.compose(engine, split, "packet")
    assert again.packets_built == 0 and composer.resident.hits == 3
    torch.testing.assert_close(
        forward(loaded, again.composed.cache, split.tail), forward(loaded, first.composed.cache, split.tail)
    )
    # the budget holds: one packet less fits, so the least recently used is dropped
    small = ResidentPackets(sum(sizes) - 1)
    packets = [cache_packet(loaded, adapter, d) for d in split.documents]
    for i, packet in enumerate(packets):
        small.put(tmp_path / str(i), packet)
    assert len(small) == 2 and small.used_bytes == sizes[1] + sizes[2] <= small.budget_bytes
    assert small.get(tmp_path / "0") is None and small.get(tmp_path / "2") is packets[2]
    nothing = ResidentPackets(0)
    nothing.put(tmp_path / "0", packets[0])
    assert len(nothing) == 0
    with pytest.raises(InvalidInputError, match="resident packet budget"):
        PacketComposer(loaded, tmp_path / "q", None, resident_bytes=-1)


@pytest.mark.parametrize("threads", [1, 2])
def test_host_packets_skip_the_file_and_stay_in_budget(tmp_path, monkeypatch, threads: int) -> None:
    """The host tier: a packet read from the store is kept (checked) in host memory, so a repeat reads
    no file, even once the file is gone; the budget holds, least recently used out first."""
    from kvpack_integrations.packet.store import packet_path

    from .support.spies import packet_file_reads
    from .support.tiny_models import make_model

    loaded = make_model("llama")
    adapter = PacketAdapter.initial(loaded, 2, 2)
    split = packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat())
    composer = PacketComposer(loaded, tmp_path / "p", adapter, resident_bytes=0, host_bytes=2**24, load_threads=threads)
    engine = Engine(loaded, packets=composer)
    assert composer.compose(engine, split, "packet").packets_built == 3 and len(composer.host) == 0
    reads = packet_file_reads(monkeypatch)
    first = composer.compose(engine, split, "packet")
    assert len(reads) == 3 and len(composer.host) == 3 and composer.host.hits == 0
    for document in split.documents:  # the store is gone: a repeat is served from host memory
        packet_path(composer.store, document, adapter, loaded.fingerprint).unlink()
    again = composer.compose(engine, split, "packet")
    assert len(reads) == 3 and again.packets_built == 0 and composer.host.hits == 3
    torch.testing.assert_close(
        forward(loaded, again.composed.cache, split.tail), forward(loaded, first.composed.cache, split.tail)
    )
    # one packet less fits: the least recently used is read again, the others are not
    used = composer.host.used_bytes
    small = PacketComposer(loaded, tmp_path / "q", adapter, resident_bytes=0, host_bytes=used - 1, load_threads=threads)
    small.compose(engine, split, "packet")  # builds them
    reads.clear()
    small.compose(engine, split, "packet")
    assert len(reads) == 3 and len(small.host) == 2 and small.host.used_bytes <= used - 1
    # the one read first is dropped for the last (on 2 threads, files finish in any order): the kept two
    # are composed from host memory
    held = [d for d in split.documents if packet_path(small.store, d, adapter, loaded.fingerprint) in small.host]
    assert len(held) == 2
    small.compose(engine, dataclasses.replace(split, documents=tuple(held)), "packet")
    assert len(reads) == 3 and small.host.hits == 2
    # the kept ones' files gone: reading the third document evicts one of them, yet this very query
    # still composes it (taken from host memory up front, not when its turn comes)
    for document in held:
        packet_path(small.store, document, adapter, loaded.fingerprint).unlink()
    again = small.compose(engine, split, "packet")
    assert again.packets_built == 0 and len(reads) == 4 and small.host.used_bytes <= used - 1
    with pytest.raises(InvalidInputError, match="host packet budget"):
        PacketComposer(loaded, tmp_path / "q", None, host_bytes=-1)


def test_resident_budget_from_the_environment(tmp_path, monkeypatch) -> None:
    from .support.tiny_models import make_model

    loaded = make_model("llama")
    monkeypatch.setenv("KVPACK_PACKET_RESIDENT_MB", "1.5")
    assert PacketComposer(loaded, tmp_path, None).resident.budget_bytes == 3 * 2**19
    assert PacketComposer(loaded, tmp_path, None, resident_bytes=0).resident.budget_bytes == 0
    monkeypatch.setenv("KVPACK_PACKET_HOST_MB", "2")
    assert PacketComposer(loaded, tmp_path, None).host.budget_bytes == 2**21
    for name in ("KVPACK_PACKET_RESIDENT_MB", "KVPACK_PACKET_HOST_MB"):
        for bad in ("lots", "inf", "nan", "-1"):
            monkeypatch.setenv(name, bad)
            with pytest.raises(InvalidInputError, match=f"{name} .*got '{bad}'"):
                PacketComposer(loaded, tmp_path, None)
            monkeypatch.setenv(name, "0")


def test_packets_are_stored_in_the_cache_dtype(tmp_path) -> None:
    from safetensors import safe_open

    from kvpack_integrations.packet.store import load_packet, packet_path, save_packet

    from .support.tiny_models import make_model

    tiny = make_model("llama")
    loaded = wrap_model(tiny.model.to(torch.bfloat16), tiny.tokenizer)
    document = packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat()).documents[0]
    packet = cache_packet(loaded, None, document)
    path = save_packet(packet_path(tmp_path, document, None, loaded.fingerprint), packet, loaded.fingerprint)
    with safe_open(str(path), framework="pt") as fh:
        assert fh.get_slice("keys").get_dtype() == "BF16" and fh.get_slice("document").get_dtype() == "I64"
    back = load_packet(path, loaded.fingerprint, loaded.dtype, loaded.device, document, None)
    assert back.document == document
    for a, b in zip((*back.keys, *back.values), (*packet.keys, *packet.values)):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)  # bit for bit: nothing converted


def test_packet_files_are_checked_on_load(tmp_path) -> None:
    """A file of another document, cut short, or lacking its document ids is refused by name."""
    from safetensors.torch import load_file, save_file

    from kvpack_integrations.errors import CorruptSegmentError
    from kvpack_integrations.packet.store import load_packet, packet_path, save_packet

    from .support.tiny_models import make_model

    loaded = make_model("llama")
    adapter = PacketAdapter.initial(loaded, 2, 2)
    first, second = packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat()).documents[:2]
    path = save_packet(
        packet_path(tmp_path, first, adapter, loaded.fingerprint),
        cache_packet(loaded, adapter, first),
        loaded.fingerprint,
        adapter,
    )
    args = (loaded.fingerprint, loaded.dtype, loaded.device)
    assert load_packet(path, *args, first, adapter).length == len(first) + 4
    with pytest.raises(CorruptSegmentError, match="another document"):
        load_packet(path, *args, (*first[:-1], first[-1] + 1), adapter)
    with pytest.raises(CorruptSegmentError, match="header \\+ document \\+ trailer"):
        load_packet(path, *args, second, adapter)  # another length: the shape check names it first
    with pytest.raises(CorruptSegmentError, match="header \\+ document \\+ trailer"):
        load_packet(path, *args, first, None)  # read as a plain packet: 4 positions too many
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(path))
    del tensors["document"]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CorruptSegmentError, match="document ids missing"):
        load_packet(path, *args, first, adapter)


def test_a_packet_of_another_adapter_is_refused(tmp_path) -> None:
    """The file records its adapter: adapter A's packet copied into adapter B's folder (same document, same
    shape) was composed as B's. Files written before the adapter was recorded are still read."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from kvpack_integrations.errors import CorruptSegmentError
    from kvpack_integrations.packet.store import adapter_id, load_packet, packet_path, save_packet

    from .support.tiny_models import make_model

    loaded = make_model("llama")
    a, b = PacketAdapter.initial(loaded, 2, 2, seed=0), PacketAdapter.initial(loaded, 2, 2, seed=1)
    document = packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat()).documents[0]
    args = (loaded.fingerprint, loaded.dtype, loaded.device, document)
    # the composer records the adapter of every packet it stores
    composer = PacketComposer(loaded, tmp_path / "store", a)
    assert composer.ensure([document]) == 1
    stored = packet_path(tmp_path / "store", document, a, loaded.fingerprint)
    with safe_open(str(stored), framework="pt") as fh:
        assert fh.metadata()["adapter"] == adapter_id(a)
    misplaced = packet_path(tmp_path / "store", document, b, loaded.fingerprint)
    misplaced.parent.mkdir(parents=True)
    misplaced.write_bytes(stored.read_bytes())
    with pytest.raises(CorruptSegmentError, match=f"wrapped in adapter {adapter_id(a)}, not {adapter_id(b)}"):
        load_packet(misplaced, *args, b)
    # the composer caches the document again under b and replaces the misplaced file
    composer_b = PacketComposer(loaded, tmp_path / "store", b)
    assert composer_b.load([document], "packet")[1] == 1
    assert load_packet(misplaced, *args, b).length == len(document) + 4
    with safe_open(str(misplaced), framework="pt") as fh:
        assert fh.metadata()["adapter"] == adapter_id(b)
    plain = save_packet(tmp_path / "plain.safetensors", cache_packet(loaded, None, document), loaded.fingerprint)
    assert load_packet(plain, *args, None).length == len(document)
    # a wrapped packet saved without its adapter would record `plain`: refused when written
    wrapped = cache_packet(loaded, a, document)
    for wrong in (None, "plain", PacketAdapter.initial(loaded, 3, 2)):
        with pytest.raises(InvalidInputError, match="pass the adapter it was cached with"):
            save_packet(tmp_path / "w.safetensors", wrapped, loaded.fingerprint, wrong)
    with pytest.raises(InvalidInputError, match="pass the adapter it was cached with"):
        save_packet(tmp_path / "w.safetensors", cache_packet(loaded, None, document), loaded.fingerprint, a)
    assert not (tmp_path / "w.safetensors").exists()
    # a file from before the adapter was recorded: accepted as before (its folder names its adapter)
    with safe_open(str(stored), framework="pt") as fh:
        metadata = {k: v for k, v in fh.metadata().items() if k != "adapter"}
    save_file(load_file(str(stored)), str(stored), metadata=metadata)
    assert load_packet(stored, *args, a).length == len(document) + 4


def test_models_sharing_a_tokenizer_share_a_store(tmp_path) -> None:
    """Two models with one tokenizer give the same document ids but other caches: each keeps its own
    packets in a shared store, neither is refused, and neither reads the other's."""
    from .support.tiny_models import make_model

    split = None
    built = []
    for seed in (0, 1):
        loaded = make_model("llama", seed=seed)
        split = packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat())
        composer = PacketComposer(loaded, tmp_path / "shared", None)
        built.append(composer.compose(Engine(loaded, packets=composer), split, "blend").packets_built)
    assert split is not None and built == [len(split.documents)] * 2
    assert len({p.parent.parent.name for p in (tmp_path / "shared").rglob("*.safetensors")}) == 2


def test_sliding_window_models_refuse_packets_past_the_window(tmp_path) -> None:
    """Sliding-window layers would keep only the last positions of a long packet or composition: refused,
    at index time and at query time, instead of composed with positions silently shifted."""
    from kvpack_integrations.errors import CompositionError

    from .support.tiny_models import make_model

    loaded = make_model("mistral", sliding_window=12)
    split = packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat())
    longest = max(split.documents, key=len)
    assert len(longest) >= 12
    with pytest.raises(CompositionError, match="window 12"):
        cache_packet(loaded, None, longest)
    composer = PacketComposer(loaded, tmp_path / "p", None)
    with pytest.raises(CompositionError, match="window 12"):
        composer.compose(Engine(loaded, packets=composer), split, "blend")
    assert not list((tmp_path / "p").rglob("*.safetensors"))  # nothing half-built was stored
    wide = make_model("mistral", sliding_window=4096)
    composer = PacketComposer(wide, tmp_path / "w", None)
    assert composer.compose(Engine(wide, packets=composer), split, "blend").packets_built == len(split.documents)


def test_only_packet_requests_build_a_composer(tmp_path) -> None:
    """A model whose RoPE cannot be re-rotated still answers exact and text requests through the
    integrations; packet requests are refused with the reason, and a bad strategy fails at the call."""
    from kvpack_integrations.errors import CompositionError
    from kvpack_integrations.llama_index import KVPackLLM

    from .support.tiny_models import make_model

    dynamic = make_model("llama", rope_parameters={"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0})
    target = tmp_path / "dynamic"
    dynamic.model.save_pretrained(target)
    dynamic.tokenizer.save_pretrained(target)
    model = KVPackChatModel(model=str(target), max_tokens=3)
    assert model.invoke(QUESTION, documents=FACTS[:2]).response_metadata["kvpack"]["exact"] is True
    with pytest.raises(CompositionError, match="RoPE type 'dynamic'"):
        model.invoke(QUESTION, documents=FACTS[:2], strategy="blend")
    llm = KVPackLLM(model=str(target), max_tokens=3)
    with pytest.raises(InvalidInputError, match="unknown strategy 'bogus'"):
        llm.stream_complete(QUESTION, strategy="bogus")  # at the call, before any chunk is asked for


def test_retriever_and_chat_model_share_a_knowledge_format(tmp_path, store) -> None:
    """Packets depend on the layout: a retriever storing them for a custom format and a chat model given
    the same format compose from the stored packets (nothing built at chat time); a request whose format
    contradicts its bound pack is refused instead of silently rendered in the pack's."""
    from kvpack_integrations.knowledge.bound import BoundPack

    path, loaded, packets = _model_and_pack(tmp_path, store)
    fmt = KnowledgeFormat(separator="\n* ")
    retriever = _retriever(store, path, packets, composition="blend", knowledge_format=fmt)
    docs = retriever.invoke("Who makes the Tessel-9 battery?")
    assert docs[0].metadata[PACKET_KEY]["built_now"]
    model = KVPackChatModel(model=path, max_tokens=4, strategy="blend", packet_store=packets, knowledge_format=fmt)
    notes = model.invoke(QUESTION, documents=docs).response_metadata["kvpack"]["notes"]
    assert not any("cached now" in n for n in notes), notes  # the retriever's packets were the ones used
    per_call = KVPackChatModel(model=path, max_tokens=4, strategy="blend", packet_store=packets)
    notes = per_call.invoke(QUESTION, documents=docs, knowledge_format=fmt).response_metadata["kvpack"]["notes"]
    assert not any("cached now" in n for n in notes), notes
    with pytest.raises(InvalidInputError, match="knowledge_format takes a KnowledgeFormat"):
        per_call.invoke(QUESTION, documents=docs, knowledge_format="\n* ")
    engine = Engine(loaded)
    bound = BoundPack.open(str(store.root), "energy")
    with pytest.raises(InvalidInputError, match="'energy' lays out its facts as"):
        chat(
            engine, ChatRequest(turns=[ChatTurn("user", QUESTION)], pack=bound, knowledge_format=fmt, settings=SETTINGS)
        )
    assert chat(engine, ChatRequest(turns=[ChatTurn("user", QUESTION)], pack=bound, settings=SETTINGS)).usage.exact


def test_streamed_composition_is_the_listed_one_and_stops_at_a_bad_file(tmp_path) -> None:
    """The composer composes each stored packet as its file arrives (read on threads): the cache is bit
    for bit the one composed from packets computed afresh, a damaged file halfway is named and nothing
    of that query is kept, and packets that do not fit the documents' lengths are refused."""
    from kvpack_integrations.errors import CompositionError

    from .support.tiny_models import make_model

    loaded = make_model("llama")
    adapter = PacketAdapter.initial(loaded, 2, 2)
    composer = PacketComposer(loaded, tmp_path, adapter, resident_bytes=10**9, load_threads=3)
    engine = Engine(loaded, packets=composer)
    split = packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat())
    composer.ensure(split.documents)
    streamed = composer.compose(engine, split, "packet").composed.cache
    composer.resident.clear()
    preamble = empty_cache(loaded)
    forward(loaded, preamble, split.preamble)
    fresh = [cache_packet(loaded, adapter, d) for d in split.documents]
    listed = compose_packets(loaded, preamble, fresh, rope_spec(loaded))
    for a, b in zip(streamed.layers, listed.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    lengths = [p.length for p in fresh]
    with pytest.raises(CompositionError, match="packet 1: a packet of shape"):
        compose_packets(loaded, empty_cache(loaded), fresh, rope_spec(loaded), lengths=[lengths[0], 99, lengths[2]])
    with pytest.raises(CompositionError, match="packet 3: no packet"):
        compose_packets(loaded, empty_cache(loaded), iter(fresh), rope_spec(loaded), lengths=[*lengths, 4])
    from kvpack_integrations.packet.store import packet_path

    bad = packet_path(tmp_path, split.documents[1], adapter, loaded.fingerprint)
    bad.write_bytes(bad.read_bytes()[:-3])
    with pytest.raises(InvalidInputError, match=f"{bad.name}: its tensors end at byte"):
        list(iter_packets([(bad, split.documents[1])], loaded.fingerprint, loaded.dtype, "cpu", adapter))


@pytest.mark.parametrize("threads", [1, 3])
def test_a_refused_packet_file_is_cached_again_and_replaced(tmp_path, threads: int) -> None:
    """A stored packet is only a cache of its document: a file cut short, of another document, another
    adapter or another model is rebuilt in its place mid-stream, the composition is the one from fresh
    packets, and the usage says which file was replaced and why."""
    from .support.tiny_models import make_model

    loaded = make_model("llama")
    adapter = PacketAdapter.initial(loaded, 2, 2)
    composer = PacketComposer(loaded, tmp_path, adapter, load_threads=threads)
    engine = Engine(loaded, packets=composer)
    split = packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat())
    composer.ensure(split.documents)
    want = composer.compose(engine, split, "packet").composed.cache
    paths = [packet_path(tmp_path, d, adapter, loaded.fingerprint) for d in split.documents]
    other = make_model("llama", seed=1)
    twin = (*split.documents[1][:-1], split.documents[1][-1] + 1)  # another document of the same length
    damages = {
        "its tensors end at byte": lambda p: p.write_bytes(p.read_bytes()[:-3]),
        "another document": lambda p: save_packet(p, cache_packet(loaded, adapter, twin), loaded.fingerprint, adapter),
        "header + document + trailer": lambda p: p.write_bytes(paths[2].read_bytes()),
        "built for another model": lambda p: save_packet(
            p, cache_packet(other, PacketAdapter.initial(other, 2, 2), split.documents[1]), other.fingerprint, adapter
        ),
    }
    for why, damage in damages.items():
        damage(paths[1])
        composition = composer.compose(engine, split, "packet")
        assert composition.packets_built == 1
        for a, b in zip(composition.composed.cache.layers, want.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        notes = composition.composed.notes
        assert any(n.startswith("1 stored packet files were refused and replaced") and why in n for n in notes), notes
        stored = load_packet(paths[1], loaded.fingerprint, loaded.dtype, "cpu", split.documents[1], adapter)
        fresh = cache_packet(loaded, adapter, split.documents[1])  # the refused file now holds its own packet
        assert torch.equal(stored.keys, fresh.keys) and torch.equal(stored.values, fresh.values)
        assert composer.compose(engine, split, "packet").packets_built == 0  # and read from then on


def test_a_document_twice_in_a_query_is_built_once(tmp_path) -> None:
    from .support.tiny_models import make_model

    loaded = make_model("llama")
    composer = PacketComposer(loaded, tmp_path, PacketAdapter.initial(loaded, 2, 2), resident_bytes=0)
    documents = packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat()).documents
    packets, built = composer.load([documents[0], documents[1], documents[0]], "packet")
    assert built == 2 and packets[0] is packets[2]
    packets, built = composer.load([documents[0], documents[0]], "packet")  # from the store: read once
    assert built == 0 and packets[0] is packets[1]


def test_threaded_reads_stay_a_bounded_window_ahead(tmp_path, monkeypatch) -> None:
    """Reads run at most 2 x threads files ahead of the packet handed out: a long query never holds every
    file's (page-locked) buffer at once."""
    from kvpack_integrations.packet import store
    from kvpack_integrations.packet.compose import PacketCache
    from kvpack_integrations.runtime.fingerprint import Fingerprint

    fp = Fingerprint("LlamaForCausalLM", 2, 2, 4, 100, "test", "test", "bfloat16")
    requests = []
    for i in range(20):
        kv = torch.zeros(2, 2, 3, 4, dtype=torch.bfloat16)
        packet = PacketCache((i, i + 1, i + 2), kv, kv.clone())
        requests.append((store.save_packet(tmp_path / f"{i}.safetensors", packet, fp), packet.document))
    reads = []
    real = store.read_tensor_file_whole
    monkeypatch.setattr(store, "read_tensor_file_whole", lambda path, **kw: reads.append(path) or real(path, **kw))
    stream = store.iter_packets(requests, fp, torch.bfloat16, "cpu", None, threads=2)
    next(stream)
    import time

    time.sleep(0.2)  # let the pool run as far ahead as it may
    assert 2 <= len(reads) <= 5  # the one handed out and at most 4 ahead, not all 20
    stream.close()


def test_a_packet_the_store_cannot_take_is_used_all_the_same(tmp_path, monkeypatch) -> None:
    """A read-only or full store: the packets computed now serve the query, and the note says they were
    not stored (before, the query failed with a raw OSError)."""
    import errno

    from kvpack_integrations.packet import composer as composer_module

    from .support.tiny_models import make_model

    loaded = make_model("llama")
    composer = PacketComposer(loaded, tmp_path, PacketAdapter.initial(loaded, 2, 2))
    split = packet_prompt(loaded.tokenizer, FACTS, QUESTION, KnowledgeFormat())

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(composer_module, "save_packet", full)
    composition = composer.compose(Engine(loaded, packets=composer), split, "packet")
    assert composition.packets_built == len(split.documents)
    assert any(n.startswith(f"{len(split.documents)} packets could not be stored") for n in composition.composed.notes)
    assert not list(tmp_path.rglob("*.safetensors"))
