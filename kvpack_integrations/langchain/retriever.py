"""`KVPackRetriever`: LangChain retriever over a stored knowledge pack, documents with segment handles.

Each `Document` carries its fact text (what text stuffing would send) plus, in `metadata["kvpack"]`,
a handle to the cached segment it came from (store, pack, fact, segment id, model fingerprint), and
its similarity in `metadata["score"]`. `search_tool()` gives a retriever tool whose result is
`content_and_artifact`: the documents travel to `KVPackChatModel` as the artifact, and the content is
exactly the text the model composes from them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ..engine.registry import shared_packet_composer
from ..engine.settings import checked_integer, checked_number, refuse_unknown_arguments
from ..errors import InvalidInputError
from ..knowledge.backends import refuse_other_backends_options
from ..knowledge.knowledge_base import DEFAULT_LEXICAL_WEIGHT, KnowledgeBase
from ..knowledge.search import PackSearcher
from ..packet.composer import PacketComposer
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.embedder import load_embedder
from ..runtime.loader import load_model
from ..segments.handles import HANDLE_KEY
from ..segments.pack_store import PackStore
from .messages import join_documents

NO_RESULTS = "No matching documents were found."
FACT_KEY = "kvpack_fact"  # where a Chroma knowledge-base fact came from (its KV is computed when used)
PACKET_KEY = "kvpack_packet"  # where a document's packet is stored (composition packet/blend)
EMPTY_QUERY = "The search query was empty: call the tool again with words to search for."
_CALL_OPTIONS = frozenset({"k", "verbose"})  # `verbose`: LangChain's own, left among a call's options
_PACKET_OPTIONS = ("model", "packet_store", "packet_adapter", "device", "dtype", "knowledge_format")


class _SearchInput(BaseModel):
    query: str


class KVPackRetriever(BaseRetriever):
    """Similarity search over a knowledge base: a stored pack, or a Chroma knowledge base with banks.

    `backend="pack"` (default) searches the facts of a pack built with `kvpack build ... --kb NAME`;
    `backend="chroma"` routes through the banks of a `KnowledgeBase` (embedded at `chroma_path`, or on
    a Chroma server at `host`/`port`), `probes` nearest banks per query.
    """

    kb: str = Field(description="name of the knowledge pack or knowledge base")
    store: str | None = Field(default=None, description="pack store directory (default: $KVPACK_STORE)")
    k: int = Field(default=4, ge=1)
    embedder: str | None = Field(default=None, description="sentence-transformers id or path; None: all-MiniLM-L6-v2")
    backend: Literal["pack", "chroma"] = "pack"
    chroma_path: str | None = Field(default=None, description="embedded Chroma directory (default: $KVPACK_KB)")
    host: str | None = Field(default=None, description="Chroma server host (backend='chroma')")
    port: int = 8000
    probes: int = Field(default=1, ge=1, description="banks searched per query (backend='chroma')")
    lexical_weight: float = Field(
        default=DEFAULT_LEXICAL_WEIGHT,
        ge=0,
        description="BM25 weight in hybrid routing; 0: dense only (backend='chroma')",
    )
    composition: Literal["exact", "packet", "blend"] = Field(
        default="exact",
        description="packet/blend: make sure every returned document has its packet in the packet store "
        "(built now if `kvpack build --packets` did not), for KVPackChatModel(strategy=the same)",
    )
    model: str | None = Field(default=None, description="model the packets are for (composition packet/blend)")
    packet_store: str | None = Field(default=None, description="packet store directory (default: $KVPACK_PACKETS)")
    packet_adapter: str | None = Field(default=None, description="packet adapter file (default: the shipped one)")
    device: str = Field(default="auto", description="device of the model the packets are for")
    dtype: str | None = Field(default="auto", description="dtype of the model the packets are for")
    knowledge_format: KnowledgeFormat | None = Field(
        default=None, description="the layout the chat model renders documents in (packets depend on it)"
    )

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _searcher: PackSearcher | None = PrivateAttr(default=None)
    _base: KnowledgeBase | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown(cls, values: Any) -> Any:
        """A typo (`search_kwargs=`, `top_k=`) must not be ignored, nor `k=True` read as one result."""
        if isinstance(values, dict):
            refuse_unknown_arguments("KVPackRetriever", cls.model_fields, values)
            for name in ("k", "probes", "port"):
                if values.get(name) is not None:
                    checked_integer(name, values[name])
            if values.get("lexical_weight") is not None:
                checked_number("lexical_weight", values["lexical_weight"])
        return values

    @model_validator(mode="after")
    def _check_kb(self) -> KVPackRetriever:
        given = {name for name in self.model_fields_set if getattr(self, name) is not None}  # None: the default
        refuse_other_backends_options(self.backend, given)
        fields = type(self).model_fields
        unused = [n for n in _PACKET_OPTIONS if n in given and getattr(self, n) != fields[n].default]
        if self.composition == "exact" and unused:
            raise InvalidInputError(
                f"composition='exact' does not use {', '.join(unused)}: options of composition='packet'/'blend' "
                "(the packets stored for the chat model), so given here they would be ignored"
            )
        if self.backend == "chroma":  # an unknown knowledge base or a dead server is named at construction
            self._base = KnowledgeBase(
                self.kb, self.chroma_path, host=self.host, port=self.port, embedder=self.embedder, create=False
            )
        else:
            PackStore(self.store).manifest(self.kb)  # an unknown pack is named at construction
        return self

    def _search(self) -> PackSearcher:
        if self._searcher is None:
            self._searcher = PackSearcher(PackStore(self.store), self.kb, load_embedder(self.embedder))
        return self._searcher

    def _packets(self) -> PacketComposer:
        loaded = load_model(self.model, device=self.device, dtype=self.dtype)  # the chat model's weights, once
        return shared_packet_composer(loaded, self.packet_store, self.packet_adapter)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        unknown = set(kwargs) - _CALL_OPTIONS
        if unknown:  # they were dropped: a search that ignores its filter looks like one that applied it
            raise InvalidInputError(f"unknown retrieval options: {', '.join(sorted(unknown))} (k is the one there is)")
        if not isinstance(query, str):
            raise InvalidInputError(f"the retrieval query must be a string, got {type(query).__name__}")
        docs = self._retrieve(query, kwargs.get("k", self.k))
        if self.composition != "exact" and docs:
            texts = [d.page_content for d in docs]
            record = self._packets().store_retrieved(texts, self.composition, self.knowledge_format)
            for d in docs:
                d.metadata[PACKET_KEY] = dict(record)
        return docs

    def _retrieve(self, query: str, k: int) -> list[Document]:
        if self._base is not None:
            routed = self._base.route(query, k=k, probes=self.probes, lexical_weight=self.lexical_weight)
            return [
                Document(
                    page_content=f.text,
                    metadata={
                        **f.metadata,
                        "score": f.score,
                        "similarity": f.similarity,
                        FACT_KEY: {"kb": self.kb, "store": self._base.where, "id": f.id, "bank": f.bank},
                    },
                )
                for f in routed
            ]
        hits = self._search().search(query, k)
        return [
            Document(page_content=h.text, metadata={"score": h.score, HANDLE_KEY: h.handle.to_dict()}) for h in hits
        ]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        """Search runs in a worker thread (embedding is CPU-bound), so the event loop stays free."""
        return await asyncio.to_thread(
            self._get_relevant_documents, query, run_manager=run_manager.get_sync(), **kwargs
        )

    def search_tool(self, name: str = "search_knowledge", description: str | None = None) -> BaseTool:
        """A retriever tool returning (content, artifact): the joined texts and the `Document`s."""

        # inside an agent loop a bad query is the model's mistake: it gets a message back, not a crash
        def search(query: str) -> tuple[str, list[Document]]:
            return _tool_result(self.invoke(query) if query.strip() else None)

        async def asearch(query: str) -> tuple[str, list[Document]]:
            return _tool_result(await self.ainvoke(query) if query.strip() else None)

        return StructuredTool.from_function(
            func=search,
            coroutine=asearch,
            name=name,
            description=description or f"Search the knowledge base {self.kb!r} for facts relevant to a query.",
            args_schema=_SearchInput,
            response_format="content_and_artifact",
        )


def _tool_result(docs: list[Document] | None) -> tuple[str, list[Document]]:
    """The search tool's (content, artifact); `None` stands for an empty query."""
    if docs is None:
        return EMPTY_QUERY, []
    return (join_documents(d.page_content for d in docs) if docs else NO_RESULTS), docs
