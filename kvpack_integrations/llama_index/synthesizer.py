"""`KVPackSynthesizer` and `KVPackQueryEngine`: retrieved nodes reach the model as segments, not `context_str`.

LlamaIndex's stock synthesizers flatten the retrieved nodes into one `context_str` string and format it
into a prompt template, so node identity is lost and every query prefills every chunk again. This
synthesizer hands the nodes themselves to `KVPackLLM(nodes=...)`: they open the system message in
the knowledge layout (an instruction, then one node per piece), the query is the user turn, and the
engine reuses every cached token prefix (a stored pack named by the nodes' handles, earlier prompts).

The prompt layout is fixed and has an exact text twin: `text_qa_template()` is a `ChatPromptTemplate`
that renders the same prompt from `context_str`, so a stock `RetrieverQueryEngine` (its default
`compact` synthesizer joins the chunks with a blank line, as the layout does) with that template
sends the model the same tokens; with `strategy="exact"` the answers are identical under greedy
decoding. A `system_prompt` on the `KVPackLLM` is the synthesizer's system prompt (LlamaIndex's
`LLM.predict` sends it too), so it is in that template: the stock engine's LLM must then have none of
its own, or LlamaIndex would send it a second time, ahead of the context. If the nodes do not fit one
context window, the engine refuses with `ContextTooLongError` (no refine passes: they would break that
equivalence).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any, Literal

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    MessageRole,
)
from llama_index.core.base.response.schema import RESPONSE_TYPE, Response
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.prompts import ChatPromptTemplate
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import BaseSynthesizer, ResponseMode
from llama_index.core.response_synthesizers.base import QueryTextType
from llama_index.core.schema import NodeWithScore
from llama_index.core.types import RESPONSE_TEXT_TYPE

from ..engine.chat import PACKET_STRATEGIES
from ..errors import InvalidInputError
from ..prompts.knowledge import KnowledgeFormat
from .llm import KVPackLLM, check_strategy
from .retriever import KVPackLlamaRetriever
from .steering import ROLE_KEY, steering_list

COMPACT_SEPARATOR = "\n\n"  # how LlamaIndex's compact synthesizer joins chunks into context_str
_NODES = "_kvpack_nodes"  # carries the nodes from synthesize() to get_response() through response_kwargs
_USAGE = "_kvpack_usage"  # a dict get_response() fills with the reply's usage report, for Response.metadata
USAGE_KEY = "kvpack"  # Response.metadata[USAGE_KEY]: the usage report of a non-streaming query's model call
_PER_QUERY = ("strategy", "steering", ROLE_KEY)
# `RetrieverQueryEngine.from_args` arguments that configure a stock text synthesizer, with the value that
# asks for nothing this one does not do: anything else there is refused by name
_STOCK_SYNTHESIZER_ARGS: dict[str, Any] = {
    "response_mode": ResponseMode.COMPACT,  # one call, chunks joined as the layout joins them
    "text_qa_template": None,
    "refine_template": None,
    "summary_template": None,
    "simple_template": None,
    "chat_content_qa_template": None,
    "chat_content_refine_template": None,
    "output_cls": None,
    "use_async": False,
    "verbose": False,
    "multimodal": False,
}
_ENGINE_OPTIONS = ("knowledge_format", "system_prompt", "strategy", "steering", ROLE_KEY, "empty_response")


def text_qa_template(
    knowledge_format: KnowledgeFormat | None = None, system_prompt: str | None = None
) -> ChatPromptTemplate:
    """The prompt `KVPackSynthesizer` renders, as a template a stock text synthesizer fills with context_str.

    System message: the knowledge instruction, the context, then `system_prompt`; user message: the query.
    Use it with `response_mode="compact"` (the default), whose chunk separator is the layout's.
    """
    fmt = knowledge_format or KnowledgeFormat()
    if fmt.separator != COMPACT_SEPARATOR:
        raise InvalidInputError(
            f"a knowledge format with separator {fmt.separator!r} has no stock text twin: LlamaIndex's compact "
            f"synthesizer joins chunks with {COMPACT_SEPARATOR!r}"
        )
    parts = [p for p in (fmt.instruction, "{context_str}", system_prompt) if p]
    return ChatPromptTemplate(
        message_templates=[
            ChatMessage(role=MessageRole.SYSTEM, content=fmt.separator.join(parts)),
            ChatMessage(role=MessageRole.USER, content="{query_str}"),
        ]
    )


class KVPackSynthesizer(BaseSynthesizer):
    """Answers from the retrieved nodes delivered to `KVPackLLM` as KV segments.

    `strategy` (`exact` | `text` | `packet` | `blend`), `steering` vectors and an `agent_role` are
    fixed per synthesizer (so per query engine) and may be overridden per call through
    `synthesize(..., strategy=..., steering=..., agent_role=...)`.

    `system_prompt` defaults to the LLM's own (refused when both are set and differ). An empty answer is
    `empty_response` (default "Empty Response", as LlamaIndex's), streamed or not, nodes or none. A
    non-streaming `Response` carries the call's usage report (strategy, exact, notes) in
    `metadata["kvpack"]`, so an approximate answer (packet, blend, steering) says so where it is read.
    """

    def __init__(
        self,
        llm: KVPackLLM | None = None,
        *,
        knowledge_format: KnowledgeFormat | None = None,
        system_prompt: str | None = None,
        strategy: str | None = None,
        steering: Any = None,
        agent_role: str | None = None,
        streaming: bool = False,
        callback_manager: CallbackManager | None = None,
        empty_response: str | None = None,
    ) -> None:
        llm = KVPackLLM() if llm is None else llm
        if not isinstance(llm, KVPackLLM):
            raise InvalidInputError(
                f"KVPackSynthesizer hands nodes to the model as KV segments, which needs a KVPackLLM, not "
                f"{type(llm).__name__}; for a text model use a stock synthesizer with text_qa_template()"
            )
        if strategy is not None:  # named now, not at the first query
            check_strategy(strategy)
        if agent_role is not None and (not isinstance(agent_role, str) or not agent_role):
            raise InvalidInputError(f"agent_role must be a non-empty string, got {agent_role!r}")
        super().__init__(llm=llm, callback_manager=callback_manager, streaming=streaming, empty_response=empty_response)
        self._kvpack_llm = llm
        self.knowledge_format = knowledge_format or KnowledgeFormat()
        self._given_format = knowledge_format  # None: the LLM's own (its bound pack's layout, if any)
        self.system_prompt = system_prompt  # None: the LLM's own, read at each call
        self._system_prompt()  # conflicting system prompts are named now, not at the first query
        self.options: dict[str, Any] = {"strategy": strategy, "steering": steering_list(steering), ROLE_KEY: agent_role}

    def _get_prompts(self) -> PromptDictType:
        """The equivalent text template (read-only: the layout is set by knowledge_format and system_prompt).

        Reading prompts never raises: a layout without a stock text twin has no template to show, so it
        gives none; `text_qa_template()` says why.
        """
        if self.knowledge_format.separator != COMPACT_SEPARATOR:
            return {}
        return {"text_qa_template": self.text_qa_template()}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        raise InvalidInputError(
            "KVPackSynthesizer's prompt layout is fixed (knowledge, then the query); set knowledge_format= and "
            "system_prompt= instead of templates"
        )

    def text_qa_template(self) -> ChatPromptTemplate:
        """The template a stock text synthesizer needs to send the model exactly this synthesizer's prompt.

        It holds the system prompt (this synthesizer's or its LLM's), so the stock engine's LLM must have
        no `system_prompt` of its own: LlamaIndex would send that ahead of the context.
        """
        return text_qa_template(self.knowledge_format, self._system_prompt())

    def _system_prompt(self) -> str | None:
        """The synthesizer's system prompt, else the LLM's: what LlamaIndex's `LLM.predict` would prepend."""
        own, llm = self.system_prompt, self._kvpack_llm.system_prompt
        if own and llm and own != llm:
            raise InvalidInputError(
                f"KVPackSynthesizer got system_prompt={own!r} and its KVPackLLM has system_prompt={llm!r}: "
                "set one of them (the synthesizer uses the LLM's when it has none)"
            )
        return own or llm

    def _messages(self, query_str: str) -> list[ChatMessage]:
        system_prompt = self._system_prompt()
        system = [ChatMessage(role=MessageRole.SYSTEM, content=system_prompt)] if system_prompt else []
        return [*system, ChatMessage(role=MessageRole.USER, content=query_str)]

    def _call(self, text_chunks: Sequence[str], kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs.pop(_USAGE, None)
        nodes = kwargs.pop(_NODES, None)
        options = {**self.options, **{k: kwargs.pop(k) for k in _PER_QUERY if k in kwargs}}
        if kwargs:
            raise InvalidInputError(f"unknown synthesizer options: {', '.join(sorted(kwargs))}")
        return {
            "nodes": list(nodes) if nodes is not None else list(text_chunks),
            "knowledge_format": self._given_format,
            **options,
        }

    def synthesize(
        self,
        query: QueryTextType,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        """The base flow (events, empty results, response objects), with the nodes themselves passed on."""
        usage: dict[str, Any] = {}
        kwargs = {**response_kwargs, _NODES: nodes, _USAGE: usage}
        return _with_usage(super().synthesize(query, nodes, additional_source_nodes, **kwargs), usage)

    async def asynthesize(
        self,
        query: QueryTextType,
        nodes: list[NodeWithScore],
        additional_source_nodes: Sequence[NodeWithScore] | None = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        usage: dict[str, Any] = {}
        kwargs = {**response_kwargs, _NODES: nodes, _USAGE: usage}
        return _with_usage(await super().asynthesize(query, nodes, additional_source_nodes, **kwargs), usage)

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        """Without nodes (called directly) the text chunks are the documents."""
        usage = response_kwargs.get(_USAGE)
        call = self._call(text_chunks, response_kwargs)
        if self._streaming:
            return self._deltas(self._kvpack_llm.stream_chat(self._messages(query_str), **call))
        return self._answer(self._kvpack_llm.chat(self._messages(query_str), **call), usage)

    async def aget_response(
        self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any
    ) -> RESPONSE_TEXT_TYPE:
        usage = response_kwargs.get(_USAGE)
        call = self._call(text_chunks, response_kwargs)
        if self._streaming:
            return self._adeltas(await self._kvpack_llm.astream_chat(self._messages(query_str), **call))
        return self._answer(await self._kvpack_llm.achat(self._messages(query_str), **call), usage)

    def _answer(self, response: ChatResponse, usage: dict[str, Any] | None) -> str:
        """The reply's text (the empty response when there is none); its usage report goes into `usage`."""
        if usage is not None and isinstance(response.raw, dict) and USAGE_KEY in response.raw:
            usage[USAGE_KEY] = response.raw[USAGE_KEY]
        return response.message.content or self._empty_response

    def _deltas(self, responses: ChatResponseGen) -> Generator[str, None, None]:
        """The text deltas; the empty response if the model said nothing (as the non-streaming answer)."""
        said = False
        for response in responses:
            if response.delta:
                said = True
                yield response.delta
        if not said:
            yield self._empty_response

    async def _adeltas(self, responses: ChatResponseAsyncGen) -> AsyncGenerator[str, None]:
        said = False
        async for response in responses:
            if response.delta:
                said = True
                yield response.delta
        if not said:
            yield self._empty_response


def _own_synthesizer(synthesizer: Any, llm: KVPackLLM | None, beside: list[str]) -> KVPackSynthesizer:
    """A synthesizer given whole: a `KVPackSynthesizer`, with no options of its own beside it."""
    if not isinstance(synthesizer, KVPackSynthesizer):
        raise InvalidInputError(
            f"KVPackQueryEngine hands nodes to the model as KV segments, which needs a KVPackSynthesizer, not "
            f"{type(synthesizer).__name__}; for a stock synthesizer use RetrieverQueryEngine"
        )
    if llm is not None and llm is not synthesizer._kvpack_llm:
        raise InvalidInputError("KVPackQueryEngine got an llm and a response_synthesizer with another llm: give one")
    if beside:
        raise InvalidInputError(
            f"KVPackQueryEngine got {', '.join(beside)} beside a response_synthesizer: set them on the synthesizer"
        )
    return synthesizer


def _with_usage(response: RESPONSE_TYPE, usage: dict[str, Any]) -> RESPONSE_TYPE:
    """A non-streaming response with its model call's usage report in `metadata["kvpack"]`."""
    if isinstance(response, Response) and USAGE_KEY in usage:
        response.metadata = {**(response.metadata or {}), USAGE_KEY: usage[USAGE_KEY]}
    return response


class KVPackQueryEngine(RetrieverQueryEngine):
    """`RetrieverQueryEngine` with a `KVPackSynthesizer`: retrieval, postprocessors, then nodes as segments.

    `strategy`, `steering` and `agent_role` select how this engine's answers are composed and steered.
    `response_synthesizer=` takes a `KVPackSynthesizer` built beforehand instead (its options are its own:
    the synthesizer options beside it are refused).
    """

    def __init__(
        self,
        retriever: BaseRetriever,
        llm: KVPackLLM | None = None,
        *,
        response_synthesizer: KVPackSynthesizer | None = None,
        node_postprocessors: list[BaseNodePostprocessor] | None = None,
        callback_manager: CallbackManager | None = None,
        knowledge_format: KnowledgeFormat | None = None,
        system_prompt: str | None = None,
        strategy: str | None = None,
        steering: Any = None,
        agent_role: str | None = None,
        streaming: bool = False,
        empty_response: str | None = None,
    ) -> None:
        if response_synthesizer is None:
            synthesizer = KVPackSynthesizer(
                llm,
                knowledge_format=knowledge_format,
                system_prompt=system_prompt,
                strategy=strategy,
                steering=steering,
                agent_role=agent_role,
                streaming=streaming,
                callback_manager=callback_manager,
                empty_response=empty_response,
            )
        else:
            options = {
                "knowledge_format": knowledge_format,
                "system_prompt": system_prompt,
                "strategy": strategy,
                "steering": steering,
                ROLE_KEY: agent_role,
                "empty_response": empty_response,
            }
            beside = sorted(k for k, v in options.items() if v is not None) + (["streaming"] if streaming else [])
            synthesizer = _own_synthesizer(response_synthesizer, llm, beside)
        super().__init__(retriever, synthesizer, node_postprocessors, callback_manager)

    @classmethod
    def from_args(  # type: ignore[override]
        cls,
        retriever: BaseRetriever,
        llm: KVPackLLM | None = None,
        response_synthesizer: KVPackSynthesizer | None = None,
        node_postprocessors: list[BaseNodePostprocessor] | None = None,
        callback_manager: CallbackManager | None = None,
        streaming: bool = False,
        **kwargs: Any,
    ) -> KVPackQueryEngine:
        """`RetrieverQueryEngine.from_args` for this engine: `llm` (a `KVPackLLM`; None: the default one, as
        for the constructor, not `Settings.llm`), `response_synthesizer` (a `KVPackSynthesizer`),
        `node_postprocessors`, `callback_manager` and `streaming` mean what they mean there, and this
        engine's own options (`strategy=`, `knowledge_format=`, ...) are taken too.

        The stock synthesizer's arguments are refused by name unless they ask for what this engine does
        (`response_mode="compact"`, no templates, no `output_cls`): the prompt layout is fixed, and the
        nodes go to the model in one call. For those, build `RetrieverQueryEngine.from_args` with
        `text_qa_template()` and a text LLM.
        """
        stock = {k: kwargs.pop(k) for k in list(kwargs) if k in _STOCK_SYNTHESIZER_ARGS}
        refused = sorted(k for k, v in stock.items() if v != _STOCK_SYNTHESIZER_ARGS[k])
        if refused:
            raise InvalidInputError(
                f"KVPackQueryEngine.from_args does not take {', '.join(refused)}: the nodes reach the model as KV "
                "segments in one fixed layout and one call (set knowledge_format= and system_prompt= instead of "
                "templates); for the stock synthesizers use RetrieverQueryEngine.from_args with text_qa_template()"
            )
        unknown = sorted(set(kwargs) - set(_ENGINE_OPTIONS))
        if unknown:
            raise InvalidInputError(f"KVPackQueryEngine.from_args got unknown arguments: {', '.join(unknown)}")
        return cls(
            retriever,
            llm,
            response_synthesizer=response_synthesizer,
            node_postprocessors=node_postprocessors,
            callback_manager=callback_manager,
            streaming=streaming,
            **kwargs,
        )

    def with_retriever(self, retriever: BaseRetriever) -> KVPackQueryEngine:
        """This engine (its synthesizer, postprocessors and callbacks) over another retriever."""
        return type(self)(
            retriever,
            response_synthesizer=self.synthesizer,
            node_postprocessors=self._node_postprocessors,
            callback_manager=self.callback_manager,
        )

    @property
    def synthesizer(self) -> KVPackSynthesizer:
        assert isinstance(self._response_synthesizer, KVPackSynthesizer)
        return self._response_synthesizer

    @classmethod
    def from_kb(
        cls,
        kb: str,
        *,
        store: str | None = None,
        llm: KVPackLLM | None = None,
        similarity_top_k: int = 4,
        order: Literal["score", "source"] = "source",
        retriever_options: dict[str, Any] | None = None,
        **engine_options: Any,
    ) -> KVPackQueryEngine:
        """A `KVPackLlamaRetriever` over `kb` (hits in store order by default) feeding this engine.

        The retriever gets the LLM's model, device, dtype and packet settings, the engine's
        `knowledge_format`, and, when the engine composes from packets (`strategy="packet"|"blend"`, the
        engine's or else the LLM's), that composition, unless `retriever_options` says otherwise: the
        packets it stores at retrieval are then the ones the LLM composes, not built at query time.
        """
        options: dict[str, Any] = {}
        if llm is not None:
            options = {
                "model": llm.model,
                "device": llm.device,
                "dtype": llm.dtype,
                "packet_store": llm.packet_store,
                "packet_adapter": llm.packet_adapter,
            }
        if engine_options.get("knowledge_format") is not None:  # packets are stored in the layout they are used in
            options["knowledge_format"] = engine_options["knowledge_format"]
        strategy = engine_options.get("strategy") or (llm.strategy if llm is not None else None)
        if strategy in PACKET_STRATEGIES:
            options["composition"] = strategy
        options.update(retriever_options or {})
        retriever = KVPackLlamaRetriever(kb, store=store, similarity_top_k=similarity_top_k, order=order, **options)
        return cls(retriever, llm, **engine_options)
