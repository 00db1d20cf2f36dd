"""A LlamaIndex `FunctionAgent` with a KV retrieval tool, planned so a small model still retrieves.

`KVRetrievalTool` searches a kvpack knowledge base and returns one text block per node: the result's
text (what a text-only model is sent) is the nodes joined by newlines, and `KVPackLLM` reads each
block as a document of that tool turn. The nodes themselves are the tool's `raw_output`.

A 135M model rarely decides to call a tool on its own. `KVPackFunctionAgent(retrievals=N)` makes the
plan explicit, like `RetrievalPlan` for LangChain: the first N model calls of a question must call
the retrieval tool (the engine writes the call under schema guidance, the model picks the query),
and the next call answers with tool calls off. The tools stay in the prompt throughout, so every
step's prompt extends the previous one and only new tokens are prefilled. `retrievals=None` leaves
the decision to the model (larger models).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.agent.workflow.workflow_events import AgentStream
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.bridge.pydantic import BaseModel, Field
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from llama_index.core.tools import AsyncBaseTool, BaseTool, ToolMetadata, ToolOutput

from ..errors import InvalidInputError
from .llm import KVPackLLM
from .retriever import KVPackLlamaRetriever

NO_RESULTS = "No matching documents were found."
EMPTY_QUERY = "The search query was empty: call the tool again with words to search for."


class _SearchInput(BaseModel):
    query: str


class KVRetrievalTool(AsyncBaseTool):
    """Search a kvpack knowledge base; the output has one text block per node, the nodes as raw output."""

    def __init__(self, retriever: KVPackLlamaRetriever, name: str = "search_knowledge", description: str | None = None):
        self.retriever = retriever
        self._metadata = ToolMetadata(
            name=name,
            description=description or f"Search the knowledge base {retriever.kb!r} for facts relevant to a query.",
            fn_schema=_SearchInput,
        )

    @property
    def metadata(self) -> ToolMetadata:
        return self._metadata

    def _output(self, query: str, nodes: list[NodeWithScore] | None) -> ToolOutput:
        name = self._metadata.get_name()
        if nodes is None:  # inside an agent loop a bad query is the model's mistake: it gets a message back
            return ToolOutput(tool_name=name, content=EMPTY_QUERY, raw_input={"query": query}, raw_output=[])
        texts = [n.node.get_content(metadata_mode=MetadataMode.LLM).strip() for n in nodes]
        blocks: list[Any] = [TextBlock(text=t) for t in texts if t] or [TextBlock(text=NO_RESULTS)]
        return ToolOutput(tool_name=name, blocks=blocks, raw_input={"query": query}, raw_output=nodes)

    def call(self, query: str = "", **kwargs: Any) -> ToolOutput:  # type: ignore[override]
        if kwargs:
            raise InvalidInputError(f"{self._metadata.get_name()} takes only a query, got {', '.join(sorted(kwargs))}")
        if not isinstance(query, str) or not query.strip():
            return self._output(str(query), None)
        return self._output(query, self.retriever.retrieve(QueryBundle(query_str=query)))

    async def acall(self, query: str = "", **kwargs: Any) -> ToolOutput:  # type: ignore[override]
        return await asyncio.to_thread(self.call, query, **kwargs)


def _calls_since_last_user(messages: Sequence[ChatMessage], tool_name: str) -> int:
    """Calls of `tool_name` made for the current question (after the last user turn)."""
    last_user = max((i for i, m in enumerate(messages) if m.role == MessageRole.USER), default=-1)
    return sum(
        isinstance(b, ToolCallBlock) and b.tool_name == tool_name
        for m in messages[last_user + 1 :]
        if m.role == MessageRole.ASSISTANT
        for b in m.blocks
    )


class KVPackFunctionAgent(FunctionAgent):
    """`FunctionAgent` with a retrieval plan: `retrievals` forced calls of `retrieval_tool`, then an answer."""

    retrievals: int | None = Field(default=None, ge=0, description="forced retrievals per question; None: no plan")
    retrieval_tool: str | None = Field(default=None, description="the tool the plan calls (default: the first)")
    answer_nudge: str | None = Field(default=None, description="a user turn added (not stored) before the answer")

    def _plan(self, messages: list[ChatMessage], tools: Sequence[AsyncBaseTool]) -> tuple[list[ChatMessage], Any]:
        """The messages and tool_choice for this step (None: the model decides)."""
        if self.retrievals is None or not tools:
            return messages, None
        name = self.retrieval_tool or tools[0].metadata.get_name()
        if _calls_since_last_user(messages, name) < self.retrievals:
            return messages, name
        nudge = [ChatMessage(role=MessageRole.USER, content=self.answer_nudge)] if self.answer_nudge else []
        return [*messages, *nudge], "none"

    async def _get_response(self, current_llm_input: list[ChatMessage], tools: Sequence[AsyncBaseTool]) -> ChatResponse:
        messages, choice = self._plan(current_llm_input, tools)
        if choice is None:
            return await super()._get_response(current_llm_input, tools)
        return await self.llm.achat_with_tools(  # type: ignore[attr-defined]
            chat_history=messages,
            tools=tools,
            allow_parallel_tool_calls=self.allow_parallel_tool_calls,
            tool_choice=choice,
        )

    async def _get_streaming_response(
        self, ctx: Any, current_llm_input: list[ChatMessage], tools: Sequence[AsyncBaseTool]
    ) -> ChatResponse:
        messages, choice = self._plan(current_llm_input, tools)
        if choice is None:
            return await super()._get_streaming_response(ctx, current_llm_input, tools)
        stream = await self.llm.astream_chat_with_tools(  # type: ignore[attr-defined]
            chat_history=messages,
            tools=tools,
            allow_parallel_tool_calls=self.allow_parallel_tool_calls,
            tool_choice=choice,
        )
        last = ChatResponse(message=ChatMessage())
        async for last in stream:
            ctx.write_event_to_stream(
                AgentStream(
                    delta=last.delta or "",
                    response=last.message.content or "",
                    tool_calls=self.llm.get_tool_calls_from_response(last, error_on_no_tool_call=False),  # type: ignore[attr-defined]
                    raw=last.raw,
                    current_agent_name=self.name,
                )
            )
        return last


def retrieval_agent(
    llm: KVPackLLM,
    tools: Sequence[BaseTool] | KVPackLlamaRetriever,
    *,
    retrievals: int | None = 2,
    system_prompt: str | None = None,
    answer_nudge: str | None = None,
    name: str = "kvpack_agent",
    **agent_options: Any,
) -> KVPackFunctionAgent:
    """A `KVPackFunctionAgent` on `llm` whose first tool (a retriever becomes a `KVRetrievalTool`) is planned."""
    if isinstance(tools, KVPackLlamaRetriever):
        tools = [KVRetrievalTool(tools)]
    if not tools:
        raise InvalidInputError("a retrieval agent needs at least one tool")
    if retrievals is not None and (not isinstance(retrievals, int) or retrievals < 0):
        raise InvalidInputError(f"retrievals must be an integer >= 0 or None, got {retrievals!r}")
    return KVPackFunctionAgent(
        name=name,
        llm=llm,
        tools=list(tools),
        system_prompt=system_prompt,
        retrievals=retrievals,
        retrieval_tool=tools[0].metadata.get_name(),
        answer_nudge=answer_nudge,
        **agent_options,
    )
