"""A retrieval agent on `langchain.agents.create_agent`, planned so a small model still retrieves.

A 135M model rarely decides to call a tool on its own. `RetrievalPlan` middleware makes the plan
explicit: the first `retrievals` model calls must call the retriever tool (the engine writes the call
under schema guidance, the model chooses the query), and the next call answers with tool calls off.
The tools stay in the prompt throughout, so every step's prompt extends the previous one and only new
tokens are prefilled. Larger models can drop the plan (`retrievals=None`) and decide for themselves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool
from langchain_core.tools import tool as as_tool

from ..errors import InvalidInputError


class RetrievalPlan(AgentMiddleware):
    """Force `retrievals` calls of `tool_name`, then one answer with tool calls switched off."""

    def __init__(self, tool_name: str, retrievals: int, answer_nudge: str | None = None) -> None:
        super().__init__()
        if not isinstance(retrievals, int) or isinstance(retrievals, bool) or retrievals < 0:
            raise InvalidInputError(f"retrievals must be an integer >= 0, got {retrievals!r}")
        self.tool_name = tool_name
        self.retrievals = retrievals
        self.answer_nudge = answer_nudge

    def _plan(self, request: ModelRequest) -> ModelRequest:
        # retrievals made for the current question: this tool's results since the last user turn
        # (a conversation kept by a checkpointer holds earlier questions' results too)
        last_user = max((i for i, m in enumerate(request.messages) if isinstance(m, HumanMessage)), default=-1)
        done = sum(isinstance(m, ToolMessage) and m.name == self.tool_name for m in request.messages[last_user + 1 :])
        if done < self.retrievals:
            return request.override(tool_choice=self.tool_name)
        messages: list[Any] = list(request.messages)
        if self.answer_nudge:
            messages.append(HumanMessage(self.answer_nudge))
        return request.override(tool_choice="none", messages=messages)

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        return handler(self._plan(request))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> Any:
        return await handler(self._plan(request))


def retrieval_agent(
    model: BaseChatModel,
    tools: Sequence[BaseTool | Callable[..., Any]],
    *,
    retrievals: int | None = 4,
    system_prompt: str | None = None,
    answer_nudge: str | None = None,
) -> Any:
    """`create_agent(model, tools)` with a `RetrievalPlan` on the first tool (None: no plan); tools may be
    functions, as `create_agent` takes them (a function's tool is named as LangChain names it)."""
    if not tools:
        raise InvalidInputError("a retrieval agent needs at least one tool")
    first = tools[0]
    if isinstance(first, BaseTool):
        name = first.name
    elif callable(first):
        name = as_tool(first).name
    else:
        raise InvalidInputError(f"the first tool (the one the plan calls) must be a tool or a function, got {first!r}")
    middleware = [] if retrievals is None else [RetrievalPlan(name, retrievals, answer_nudge)]
    return create_agent(model, tools=list(tools), system_prompt=system_prompt, middleware=middleware)


def final_answer(messages: Sequence[BaseMessage]) -> str:
    """The text of the agent's last message."""
    return str(messages[-1].text) if messages else ""
