"""KV Packet in the product: `strategy="packet"`/`"blend"` in the engine, KVPackChatModel and the retriever,
packets stored at index time and reused, approximate usage reports, and refusals."""

from __future__ import annotations

import pytest
import torch

from kvpack_integrations import build_pack, load_model
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
    assert u.cached_tokens == len(split.preamble) + sum(len(d) + 5 for d in split.documents)
    assert u.prefilled_tokens == len(split.tail) and u.input_tokens == u.cached_tokens + len(split.tail)
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


def test_chat_model_and_retriever_with_packets(tmp_path, store) -> None:
    path = save_model_dir("llama", tmp_path / "models")
    loaded = load_model(path)
    adapter_file = PacketAdapter.initial(loaded, 2, 2).save(tmp_path / "adapter.safetensors")
    packets = str(tmp_path / "packets")
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "energy", FACTS)
    retriever = KVPackRetriever(
        kb="energy",
        store=str(store.root),
        k=2,
        composition="packet",
        model=path,
        packet_store=packets,
        packet_adapter=str(adapter_file),
    )
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
