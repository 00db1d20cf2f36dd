"""`KVPackLLM`: a LlamaIndex function-calling LLM on a local transformers model, knowledge as KV segments.

A thin adapter, like `KVPackChatModel` for LangChain: LlamaIndex messages, nodes, tools and options
become an engine `ChatRequest`; rendering, prefix reuse, tool-call parsing and guided decoding happen
in the engine. Weights load lazily, once per process, and every instance on the same weights shares
one engine (one prefix tree), so an agent's next step prefills only what is new.

Nodes passed with `nodes=` open the system message in the knowledge layout, exactly where a text
synthesizer with `text_qa_template()` puts `context_str`. When the first node is the first fact of a
stored pack of this model (nodes in pack order), the engine makes that pack resident (loaded from the store,
verified), so the knowledge is served from it as far as its tokens match. A node cached by another
model, or whose pack or segment is gone from its store (checked for the exact strategy), is computed on
this model with a note, or refused under `strict_segments=True` (checked for every strategy).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator, model_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection, default_completion_to_prompt

from ..engine.chat import PACKET_STRATEGIES, REQUEST_STRATEGIES, ChatReply, ChatRequest, stream_chat, tool_parameters
from ..engine.engine import Engine
from ..engine.registry import shared_engine, shared_packet_composer
from ..engine.settings import GenerationSettings, checked_integer, refuse_unknown_arguments, settings_from_options
from ..engine.tool_choice import normalize_tool_choice
from ..errors import (
    ContextTooLongError,
    InvalidInputError,
)
from ..knowledge.bound import BoundPack
from ..packet.composer import PacketComposer
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.default_model import DEFAULT_MODEL_NAME
from ..runtime.loader import LoadedModel, config_source, load_model
from .messages import call_blocks, node_documents, to_turns, tool_arguments
from .steering import ROLE_KEY, role_mapping, steering_list, vectors_for_role

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

_CALL_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
_FLAGS = ("remember", "strict_segments")
# LlamaIndex's prompt hooks for completion models: this LLM always renders with the model's chat template,
# so a hook given would be ignored; the library's own defaults (what the base class fills in) are no hook
_PROMPT_HOOKS = {
    "messages_to_prompt": generic_messages_to_prompt,
    "completion_to_prompt": default_completion_to_prompt,
    "query_wrapper_prompt": None,
}
_KNOWN_CALL_KWARGS = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "nodes",
        "knowledge_format",
        "strategy",
        "steering",
        ROLE_KEY,
        *_CALL_OPTIONS,
    }
)


def openai_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """LlamaIndex tools (or OpenAI-style dicts) as OpenAI function specs."""
    out = []
    for i, tool in enumerate(tools):
        if isinstance(tool, Mapping):
            out.append(dict(tool))
        elif hasattr(tool, "metadata") and hasattr(tool.metadata, "to_openai_tool"):
            out.append(tool.metadata.to_openai_tool(skip_length_check=True))
        else:
            raise InvalidInputError(f"tools[{i}] is a {type(tool).__name__}: pass LlamaIndex tools or OpenAI dicts")
    return out


class KVPackLLM(FunctionCallingLLM):
    """LlamaIndex LLM over a local transformers model that reuses KV caches instead of re-prefilling.

    `KVPackLLM()` runs the embedded SmolLM2-135M-Instruct. `kb=` binds a stored knowledge pack (its
    facts open every prompt); `nodes=` on a call adds retrieved nodes after them. With
    `strategy="exact"` (the default) the output equals text stuffing of the same texts in the same
    places; `"text"` is plain text stuffing on the same engine; `"packet"`/`"blend"` compose the
    documents from independently cached packets (approximate, said in the usage report).
    """

    model: str | None = Field(default=None, description="hub id, model directory or .gguf file; None: the default")
    device: str = "auto"
    dtype: str | None = "auto"
    kb: str | None = Field(default=None, description="name of a stored knowledge pack to bind")
    store: str | None = Field(default=None, description="pack store directory (default: $KVPACK_STORE)")
    max_tokens: int = Field(default=256, ge=1, description="new tokens per call (LLMMetadata.num_output)")
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: list[str] | None = None
    context_window: int | None = Field(default=None, ge=1, description="None: the model's own window")
    strategy: Literal["exact", "text", "packet", "blend"] = "exact"
    packet_store: str | None = Field(default=None, description="packet store directory (default: $KVPACK_PACKETS)")
    packet_adapter: str | None = Field(default=None, description="packet adapter file (default: the shipped one)")
    remember: bool = Field(default=True, description="keep each prompt's cache for the next step")
    strict_segments: bool = Field(default=False, description="refuse nodes cached by another model or missing")
    steering: list[Any] = Field(default_factory=list, exclude=True, description="SteeringVectors for every call")
    roles: dict[str, Any] = Field(default_factory=dict, exclude=True, description="agent role -> SteeringVector(s)")
    agent_role: str | None = Field(default=None, description="the role whose vectors this instance applies")

    _pack: BoundPack | None = PrivateAttr(default=None)
    _window: tuple[str | None, int] | None = PrivateAttr(default=None)  # (model, its own context window)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown(cls, values: Any) -> Any:
        """A typo must not be ignored silently, nor a prompt hook this LLM would not call."""
        if isinstance(values, dict):
            refuse_unknown_arguments("KVPackLLM", cls.model_fields, values)
            hooks = sorted(k for k, default in _PROMPT_HOOKS.items() if values.get(k) not in (None, default))
            if hooks:
                raise InvalidInputError(
                    f"KVPackLLM does not take {', '.join(hooks)}: every prompt is rendered with the model's own "
                    "chat template (a function or wrapper given here would be ignored); pass messages, or set "
                    "system_prompt="
                )
        return values

    @model_validator(mode="before")
    @classmethod
    def _check_options(cls, values: Any) -> Any:
        """Options checked as a call's are, by the same names, never coerced: pydantic's lax mode made
        `max_tokens=True` 1 and `"5"` 5, which a call refuses. Checked values are stored as checked."""
        if not isinstance(values, dict):
            return values
        given = {k: v for k, v in values.items() if k in _CALL_OPTIONS and v is not None}

        def option(name: str) -> Any:
            return given.get(name, cls.model_fields[name].default)

        settings = settings_from_options(option, option("stop"))
        checked = {
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
            "seed": settings.seed,
            "stop": list(settings.stop),
        }
        values = {**values, **{k: checked[k] for k in given}}
        if values.get("context_window") is not None:
            window = checked_integer("context_window", values["context_window"])
            if window < 1:
                raise InvalidInputError(f"context_window must be >= 1 (or None: the model's own), got {window}")
            values["context_window"] = window
        for flag in _FLAGS:
            if flag in values and not isinstance(values[flag], bool):
                raise InvalidInputError(f"{flag} must be True or False, got {values[flag]!r}")
        return values

    @field_validator("steering", mode="before")
    @classmethod
    def _check_steering(cls, value: Any) -> list[Any]:
        return steering_list(value)

    @field_validator("roles", mode="before")
    @classmethod
    def _check_roles(cls, value: Any) -> dict[str, Any]:
        return {role: list(vectors) for role, vectors in role_mapping(value).items()}

    @field_validator("strategy", mode="before")
    @classmethod
    def _check_strategy(cls, value: Any) -> str:
        return check_strategy(value)  # named as a call names it

    @field_validator("agent_role", mode="before")
    @classmethod
    def _check_agent_role(cls, value: Any) -> str | None:
        if value is not None and (not isinstance(value, str) or not value):
            raise InvalidInputError(f"agent_role must be a non-empty string, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_kb(self) -> KVPackLLM:
        if self.kb is not None:
            self._pack = BoundPack.open(self.store, self.kb)
        return self

    @classmethod
    def class_name(cls) -> str:
        return "kvpack_llm"

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL_NAME

    @property
    def metadata(self) -> LLMMetadata:
        """The model's context window, read without loading weights: an async agent reads this on its event
        loop at every step, where loading the weights would stall every other task.

        The window comes from `context_window=`, else the model's config (kept per instance; a loaded
        model's own once loaded). A bound pack (`kb=`) opens every prompt, so its tokens (the manifest's
        count) are not free for the nodes and the query: a synthesizer sizing its prompt from this window
        must not count them. A pack that leaves no room for even one query token and one new token is a
        `ContextTooLongError` here, named, as every call would be (a window of 0 or less would fail later,
        unnamed). `max_tokens` is not held against it: a call may ask for fewer, and LlamaIndex's prompt
        helper sizes with it.
        """
        window = self.context_window or self._model_window()
        if self._pack is not None:
            # the manifest is re-read only when its file changed (a rebuilt pack): a stat per read
            pack_tokens = self._pack.manifest().token_count
            if pack_tokens + 2 > window:
                raise ContextTooLongError(
                    f"knowledge base {self.kb!r} holds {pack_tokens} tokens: a {window}-token context window "
                    "leaves no room for a query and its answer; bind fewer facts or raise context_window"
                )
            window -= pack_tokens
        return LLMMetadata(
            context_window=window,
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self.model_name,
            system_role=MessageRole.SYSTEM,
        )

    def loaded_model(self) -> LoadedModel:
        """The weights for this instance, loaded once per process."""
        loaded = load_model(self.model, device=self.device, dtype=self.dtype)
        self._window = (self.model, loaded.context_window)
        return loaded

    def _model_window(self) -> int:
        """The model's own context window: the loaded model's, else its config's (no weights read), else
        (a GGUF file not converted yet, whose config is inside it) the weights are loaded once to read it."""
        if self._window is None or self._window[0] != self.model:
            window = config_context_window(self.model)
            self._window = (self.model, window) if window is not None else None
        return self._window[1] if self._window is not None else self.loaded_model().context_window

    def for_role(self, role: str) -> KVPackLLM:
        """A copy that applies `role`'s steering vectors (same weights, engine and prefix tree)."""
        if not isinstance(role, str) or not role:
            raise InvalidInputError(f"agent_role must be a non-empty string, got {role!r}")
        copy = self.model_copy(update={"agent_role": role})
        copy._pack = self._pack
        return copy

    def packet_composer(self, loaded: LoadedModel) -> PacketComposer:
        """This instance's packet store and adapter (the engine's defaults when neither is set)."""
        return shared_packet_composer(loaded, self.packet_store, self.packet_adapter)

    # -- requests -------------------------------------------------------------------------------------

    def _settings(self, kwargs: Mapping[str, Any]) -> GenerationSettings:
        def option(name: str) -> Any:  # None on a call means "this LLM's setting"
            value = kwargs.get(name)
            return getattr(self, name) if value is None else value

        return settings_from_options(option, option("stop"))

    def _request(
        self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any], loaded: LoadedModel
    ) -> tuple[ChatRequest, list[str]]:
        """The engine request and the translation notes."""
        unknown = set(kwargs) - _KNOWN_CALL_KWARGS
        if unknown:
            raise InvalidInputError(f"unknown call options: {', '.join(sorted(unknown))}")
        turns = to_turns(messages)
        documents = node_documents(kwargs.get("nodes"))
        tools = openai_tools(kwargs.get("tools") or [])
        names = list(tool_parameters(tools))  # refuses schemas the model cannot call, naming the tool
        fmt = kwargs.get("knowledge_format")
        if fmt is not None and not isinstance(fmt, KnowledgeFormat):
            raise InvalidInputError(f"knowledge_format takes a KnowledgeFormat, got {type(fmt).__name__}")
        role = kwargs.get(ROLE_KEY)
        by_role, role_notes = vectors_for_role(role_mapping(self.roles), self.agent_role if role is None else role)
        steering = [*self.steering, *steering_list(kwargs.get("steering")), *by_role]
        strategy = self.strategy if kwargs.get("strategy") is None else check_strategy(kwargs["strategy"])
        request = ChatRequest(
            turns=turns,
            knowledge=[d.text for d in documents],
            knowledge_format=fmt,
            handles=[d.handle for d in documents if d.handle is not None],
            pack=self._pack,
            tools=tools,
            tool_choice=normalize_tool_choice(kwargs.get("tool_choice"), names),
            settings=self._settings(kwargs),
            strategy=strategy,
            remember=self.remember,
            strict_segments=self.strict_segments,
            steering=steering,
            # only packet requests need a composer: building one refuses models whose RoPE cannot be
            # re-rotated, which exact and text requests run on
            packets=self.packet_composer(loaded) if strategy in PACKET_STRATEGIES else None,
        )
        return request, role_notes

    def _run(self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]) -> Generator[ChatResponse, None, None]:
        """Translate now (bad input fails at the call, not at the first chunk); decode as iterated."""
        loaded = self.loaded_model()
        request, notes = self._request(messages, kwargs, loaded)
        single_call = kwargs.get("parallel_tool_calls") is False
        return self._responses(shared_engine(loaded), request, notes, single_call)

    def _responses(
        self, engine: Engine, request: ChatRequest, notes: list[str], single_call: bool = False
    ) -> Generator[ChatResponse, None, None]:
        """Chat responses as the engine decodes, the last with usage and tool calls (only the first call
        with `single_call`: `allow_parallel_tool_calls=False` holds on every path, streaming included)."""
        text = ""
        for delta in stream_chat(engine, request):
            if delta.reply is None:
                text += delta.text
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta.text)
                continue
            delta.reply.usage.notes.extend(notes)
            if single_call:
                delta.reply.tool_calls = delta.reply.tool_calls[:1]
            yield self._response(delta.reply, engine.loaded, delta.text)

    def _response(self, reply: ChatReply, loaded: LoadedModel, delta: str) -> ChatResponse:
        usage = reply.usage
        blocks: list[Any] = [TextBlock(text=reply.text), *call_blocks(reply.tool_calls)]
        counts = {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
        }
        extra: dict[str, Any] = {
            **counts,
            "cached_tokens": usage.cached_tokens,
            "prefilled_tokens": usage.prefilled_tokens,
            "strategy": usage.strategy,  # exact=False: an approximate path (packets, steering) was used
            "exact": usage.exact,
        }
        if reply.invalid_tool_calls:
            extra["invalid_tool_calls"] = list(reply.invalid_tool_calls)
        raw = {
            "model": loaded.name,
            "finish_reason": reply.finish_reason,
            "usage": {**counts, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}},
            "kvpack": usage.to_dict(),
        }
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks),
            delta=delta,
            raw=raw,
            additional_kwargs=extra,
        )

    # -- chat and completion --------------------------------------------------------------------------

    def _chat(self, messages: Sequence[ChatMessage], kwargs: Mapping[str, Any]) -> ChatResponse:
        *_, reply = self._run(messages, kwargs)  # text chunks, then the reply with usage and calls
        return reply

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._run(messages, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """The engine is synchronous: it runs in a worker thread, so the event loop stays free."""
        return await asyncio.to_thread(self._chat, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return _in_threads(await asyncio.to_thread(self._run, messages, kwargs))  # the first call loads weights

    def _completion_messages(self, prompt: str, formatted: bool) -> list[ChatMessage]:
        if formatted:
            raise InvalidInputError(
                "KVPackLLM renders prompts with the model's own chat template; pass the prompt unformatted "
                "(formatted=False)"
            )
        system = [ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt)] if self.system_prompt else []
        return [*system, ChatMessage(role=MessageRole.USER, content=prompt)]

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """`prompt` as one user turn (after the LLM's `system_prompt`, if set), rendered with the template."""
        return _completion(self._chat(self._completion_messages(prompt, formatted), kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return (_completion(r) for r in self._run(self._completion_messages(prompt, formatted), kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        messages = self._completion_messages(prompt, formatted)
        return _completion(await asyncio.to_thread(self._chat, messages, kwargs))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        messages = self._completion_messages(prompt, formatted)

        responses = _in_threads(await asyncio.to_thread(self._run, messages, kwargs))

        async def gen() -> CompletionResponseAsyncGen:
            async for response in responses:
                yield _completion(response)

        return gen()

    # -- tools ----------------------------------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """`tool_required` forces a call (written under schema guidance); `tool_choice` may name one tool."""
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        specs = openai_tools(tools)
        if tool_choice is None and tool_required:
            tool_choice = "required"
        return {
            "messages": messages,
            "tools": specs,
            "tool_choice": tool_choice,
            "parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The `ToolCallBlock`s of a response as `ToolSelection`s.

        A call the model began that cannot be used (cut off by `max_tokens`, unreadable) is refused, named,
        even with `error_on_no_tool_call=False`: running the calls beside it, or taking the reply for an
        answer (what an agent does when no call is returned), would go on without it silently;
        `predict_and_call`, `structured_predict` and the agents read calls here.
        """
        invalid = (response.additional_kwargs or {}).get("invalid_tool_calls") or []
        if invalid:
            raise InvalidInputError(
                f"the model's tool call cannot be used: {'; '.join(map(str, invalid))} (finish_reason "
                f"{(response.raw or {}).get('finish_reason')!r})"
            )
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise ValueError(
                "the model answered without calling a tool; pass tool_required=True (or tool_choice=a tool name) "
                "to have the call written under schema guidance"
            )
        return [
            ToolSelection(
                tool_id=b.tool_call_id or b.tool_name,
                tool_name=b.tool_name,
                # arguments given as JSON text are parsed (invalid JSON refused by name), not dropped
                tool_kwargs=tool_arguments(b.tool_kwargs, f"tool call {b.tool_name!r}"),
            )
            for b in calls
        ]


def check_strategy(strategy: Any) -> str:
    """A strategy name, refused by name when it is not one (a list failed unhashable, unnamed)."""
    if not isinstance(strategy, str) or strategy not in REQUEST_STRATEGIES:
        raise InvalidInputError(f"unknown strategy {strategy!r}: use one of {', '.join(REQUEST_STRATEGIES)}")
    return strategy


def config_context_window(source: str | None) -> int | None:
    """The context window read from the model's config alone, as `LoadedModel.context_window` reads it
    from the loaded model; None where there is no config without loading (a GGUF file not converted yet,
    or a source that does not load: loading names why)."""
    from transformers import AutoConfig

    where = config_source(source)
    if where is None:
        return None
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError, KeyError):
        return None
    text = config.get_text_config(decoder=True)
    return int(getattr(text, "max_position_embeddings", 0) or 2048)


def _completion(response: ChatResponse) -> CompletionResponse:
    return CompletionResponse(
        text=response.message.content or "",
        delta=response.delta,
        raw=response.raw,
        additional_kwargs=response.additional_kwargs,
    )


async def _in_threads(responses: Generator[ChatResponse, None, None]) -> AsyncGenerator[ChatResponse, None]:
    """A synchronous generator driven from worker threads, one step at a time.

    A consumer that stops early (break, then `aclose()`) closes the decoding generator too, so its cache
    is freed now rather than whenever the generator is collected. After a cancelled step the generator
    may still run in its worker: it cannot be closed from here then, and is collected once that step returns.
    """
    done = object()
    try:
        while True:
            item = await asyncio.to_thread(next, responses, done)
            if item is done:
                return
            yield item  # type: ignore[misc]
    finally:
        if inspect.getgeneratorstate(responses) != inspect.GEN_RUNNING:
            with contextlib.suppress(ValueError):  # a cancelled step's worker began one between check and close
                responses.close()
