"""`KVPackLlamaRetriever`: a LlamaIndex retriever over a kvpack knowledge base, nodes with segment handles.

Each `NodeWithScore` holds a `TextNode` whose text is the fact (what a text synthesizer would send)
and whose metadata carries where its KV comes from: `metadata["kvpack"]`, the handle of the stored
segment (store, pack, fact, segment id, model fingerprint) for `backend="pack"`, or
`metadata["kvpack_fact"]` (knowledge base, Chroma location, fact id, bank) for `backend="chroma"`,
whose KV is computed when used. Those keys are excluded from the LLM and embedding views of the
node, so the text a synthesizer flattens is the fact alone.

`order="source"` returns the hits in their order in the store (pack position; Chroma: insertion order)
instead of best-first: with exact prefix reuse, two queries whose hits overlap then share a longer
prompt prefix, and hits that open the pack are served from the stored pack itself.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from ..engine.registry import shared_packet_composer
from ..errors import InvalidInputError
from ..knowledge.backends import refuse_other_backends_options
from ..knowledge.knowledge_base import DEFAULT_LEXICAL_WEIGHT, KnowledgeBase
from ..knowledge.search import PackSearcher, check_k
from ..packet.composer import PacketComposer
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.embedder import load_embedder
from ..runtime.loader import load_model
from ..segments.handles import HANDLE_KEY
from ..segments.pack_store import PackStore

FACT_KEY = "kvpack_fact"  # where a Chroma knowledge-base fact came from (its KV is computed when used)
PACKET_KEY = "kvpack_packet"  # where a node's packet is stored (composition packet/blend)
SIMILARITY_KEY = "similarity"
_KVPACK_KEYS = (HANDLE_KEY, FACT_KEY, PACKET_KEY, SIMILARITY_KEY)
ORDERS = ("score", "source")
_BASE_OPTIONS = frozenset({"callback_manager", "object_map", "objects", "verbose"})  # BaseRetriever's own
DEFAULT_PORT = 8000


class KVPackLlamaRetriever(BaseRetriever):
    """Similarity search over a stored pack (`backend="pack"`) or a Chroma knowledge base with banks.

    `backend="chroma"` routes through the banks of a `KnowledgeBase` (embedded at `chroma_path`, or a
    Chroma server at `host`/`port`), `probes` nearest banks per query, hybrid with BM25 unless
    `lexical_weight=0`. `composition="packet"|"blend"` makes sure every returned node has its packet
    in the packet store, for `KVPackLLM(strategy=the same)` with the same `knowledge_format`.

    The options only the Chroma backend reads (`chroma_path`, `host`, `port`, `probes`, `lexical_weight`)
    are refused with `backend="pack"`, and `store` with `backend="chroma"`, as unknown ones are: given
    there they would be ignored.

    A `QueryBundle`'s `embedding_strs` (its `custom_embedding_strs`, e.g. from a HyDE transform, else
    the query) are what is searched for, joined by newlines into one text: both backends embed one text
    (and BM25 reads its words), so the strings are searched together rather than their embeddings
    averaged. A precomputed `QueryBundle.embedding` is not used: it may come from another embedding
    model, and this retriever embeds with its own.
    """

    def __init__(
        self,
        kb: str,
        *,
        store: str | None = None,
        similarity_top_k: int = 4,
        embedder: str | None = None,
        backend: Literal["pack", "chroma"] = "pack",
        chroma_path: str | None = None,
        host: str | None = None,
        port: int | None = None,
        probes: int | None = None,
        lexical_weight: float | None = None,
        order: Literal["score", "source"] = "score",
        composition: Literal["exact", "packet", "blend"] = "exact",
        model: str | None = None,
        packet_store: str | None = None,
        packet_adapter: str | None = None,
        knowledge_format: KnowledgeFormat | None = None,
        device: str = "auto",
        dtype: str | None = "auto",
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - _BASE_OPTIONS
        if unknown:
            raise InvalidInputError(f"KVPackLlamaRetriever got unknown arguments: {', '.join(sorted(unknown))}")
        check_k(similarity_top_k)
        options: dict[str, object] = {"chroma_path": chroma_path, "host": host, "port": port, "probes": probes}
        options |= {"lexical_weight": lexical_weight, "store": store}
        refuse_other_backends_options(backend, [name for name, value in options.items() if value is not None])
        if order not in ORDERS:
            raise InvalidInputError(f"unknown order {order!r}: use one of {', '.join(ORDERS)}")
        if composition not in ("exact", "packet", "blend"):
            raise InvalidInputError(f"unknown composition {composition!r}: use exact, packet or blend")
        super().__init__(**kwargs)
        self.kb = kb
        self.store = store
        self.similarity_top_k = similarity_top_k
        self.backend = backend
        self.probes = 1 if probes is None else probes
        self.lexical_weight = DEFAULT_LEXICAL_WEIGHT if lexical_weight is None else lexical_weight
        self.order = order
        self.composition = composition
        self.model = model
        self.packet_store = packet_store
        self.packet_adapter = packet_adapter
        self.knowledge_format = knowledge_format
        self.device, self.dtype = device, dtype
        self._embedder = embedder
        self._searcher: PackSearcher | None = None
        self._base: KnowledgeBase | None = None
        if backend == "chroma":  # an unknown knowledge base or a dead server is named at construction
            port = DEFAULT_PORT if port is None else port
            self._base = KnowledgeBase(kb, chroma_path, host=host, port=port, embedder=embedder, create=False)
        else:
            PackStore(store).manifest(kb)  # an unknown pack is named at construction

    def _search(self) -> PackSearcher:
        if self._searcher is None:
            self._searcher = PackSearcher(PackStore(self.store), self.kb, load_embedder(self._embedder))
        return self._searcher

    def _packets(self) -> PacketComposer:
        loaded = load_model(self.model, device=self.device, dtype=self.dtype)  # the LLM's weights, once
        return shared_packet_composer(loaded, self.packet_store, self.packet_adapter)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        nodes = self._hits(search_text(query_bundle))
        if self.order == "source":
            nodes.sort(key=_source_position)
        if self.composition != "exact" and nodes:
            texts = [n.node.get_content() for n in nodes]
            record = self._packets().store_retrieved(texts, self.composition, self.knowledge_format)
            for n in nodes:
                n.node.metadata[PACKET_KEY] = dict(record)
        return nodes

    def _hits(self, query: str) -> list[NodeWithScore]:
        if self._base is not None:
            routed = self._base.route(
                query, k=self.similarity_top_k, probes=self.probes, lexical_weight=self.lexical_weight
            )
            return [
                NodeWithScore(
                    node=_node(
                        f.id,
                        f.text,
                        {
                            **f.metadata,
                            SIMILARITY_KEY: f.similarity,
                            FACT_KEY: {
                                "kb": self.kb,
                                "store": self._base.where,
                                "id": f.id,
                                "bank": f.bank,
                                "position": f.position,
                            },
                        },
                    ),
                    score=f.score,
                )
                for f in routed
            ]
        hits = self._search().search(query, self.similarity_top_k)
        return [
            NodeWithScore(
                node=_node(
                    h.handle.segment_id or f"{self.kb}-{h.handle.fact_index}", h.text, {HANDLE_KEY: h.handle.to_dict()}
                ),
                score=h.score,
            )
            for h in hits
        ]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        """Search runs in a worker thread (embedding is CPU-bound), so the event loop stays free."""
        return await asyncio.to_thread(self._retrieve, query_bundle)


def search_text(query_bundle: QueryBundle) -> str:
    """The text searched for: the bundle's `embedding_strs` (custom ones, else the query) joined by newlines."""
    strings = query_bundle.embedding_strs
    if isinstance(strings, str) or not all(isinstance(s, str) for s in strings):
        raise InvalidInputError(f"QueryBundle.custom_embedding_strs must be a list of strings, got {strings!r}")
    return "\n".join(strings)


def _node(node_id: str, text: str, metadata: dict[str, Any]) -> TextNode:
    """A node whose LLM and embedding views are its text alone (no metadata header, packet info added later)."""
    keys = [*metadata, *(k for k in _KVPACK_KEYS if k not in metadata)]
    return TextNode(
        id_=node_id,
        text=text,
        metadata=metadata,
        excluded_llm_metadata_keys=keys,
        excluded_embed_metadata_keys=keys,
    )


def _source_position(hit: NodeWithScore) -> tuple[str, str, int]:
    """Position in the store: (store, pack, fact index) for pack hits, the insertion order for Chroma ones."""
    metadata = hit.node.metadata
    handle = metadata.get(HANDLE_KEY)
    if isinstance(handle, dict):
        return (str(handle.get("store")), str(handle.get("pack")), int(handle.get("fact_index", 0)))
    fact = metadata.get(FACT_KEY) or {}
    return (str(fact.get("store", "")), str(fact.get("kb", "")), int(fact.get("position", 0)))
