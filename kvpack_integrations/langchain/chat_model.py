"""`KVPackChatModel`: a LangChain chat model on a local transformers model, knowledge as KV segments.

A thin adapter: LangChain messages, tools and options are translated into an engine `ChatRequest`;
rendering, prefix reuse, tool-call parsing and guided decoding all happen in the engine. Weights load
lazily, once per process, and every instance on the same weights shares one engine (one prefix tree),
so each step of an agent loop prefills only what is new to the conversation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from ..engine.chat import (
    FREE_FORM_JSON,
    PACKET_STRATEGIES,
    ChatReply,
    ChatRequest,
    chat,
    stream_chat,
    tool_parameters,
)
from ..engine.json_decoding import check_schema
from ..engine.registry import shared_engine, shared_packet_composer
from ..engine.settings import (
    GenerationSettings,
    checked_integer,
    checked_number,
    refuse_unknown_arguments,
    settings_from_options,
)
from ..engine.tool_choice import normalize_tool_choice
from ..engine.usage import Usage
from ..errors import InvalidInputError
from ..knowledge.bound import BoundPack
from ..packet.composer import PacketComposer
from ..prompts.knowledge import KnowledgeFormat
from ..runtime.default_model import DEFAULT_MODEL_NAME
from ..runtime.loader import LoadedModel, load_model
from ..steering.vector import SteeringVector
from .messages import call_documents, to_turns
from .steering_callback import ROLE_KEY, calling, pending_steering, steering_for_run

_CALL_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
_CALL_KEYS = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "documents",
        "model",
        "strategy",
        "steering",
        "knowledge_format",
        ROLE_KEY,
        *_CALL_OPTIONS,
    }
)
_STRUCTURED_METHODS = ("json_schema", "function_calling", "json_mode")
_REMOTE_ONLY = frozenset({"timeout", "max_retries", "api_key", "base_url"})  # accepted, meaningless locally


class KVPackChatModel(BaseChatModel):
    """Chat model over a local transformers model that reuses KV caches instead of re-prefilling.

    `KVPackChatModel()` runs the embedded SmolLM2-135M-Instruct. `kb=` binds a stored knowledge pack
    (its facts open the system message, served from the store); `documents=` on a call adds documents
    after them; retriever-tool results arrive as `ToolMessage` artifacts. With `strategy="exact"` (the
    default) the output equals text stuffing of the same documents in the same places.
    """

    model: str | None = Field(default=None, description="hub id, model directory or .gguf file; None: the default")
    device: str = "auto"
    dtype: str | None = "auto"
    kb: str | None = Field(default=None, description="name of a stored knowledge pack to bind")
    store: str | None = Field(default=None, description="pack store directory (default: $KVPACK_STORE)")
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    strategy: Literal["exact", "text", "packet", "blend"] = Field(
        default="exact",
        description="exact: prefix reuse, same output as text; text: plain stuffing; packet/blend: documents "
        "composed from independently cached packets (approximate, see the usage report)",
    )
    packet_store: str | None = Field(default=None, description="packet store directory (default: $KVPACK_PACKETS)")
    packet_adapter: str | None = Field(default=None, description="packet adapter file (default: the shipped one)")
    knowledge_format: KnowledgeFormat | None = Field(
        default=None,
        description="layout of documents in the system message (default: the bound pack's, else the standard one); "
        "a KVPackRetriever storing packets for this model needs the same",
    )
    remember: bool = Field(default=True, description="keep each prompt's cache for the next step")
    strict_segments: bool = Field(default=False, description="refuse documents cached by another model")
    streaming: bool = Field(default=False, description="invoke() decodes through the streaming path")

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=(), arbitrary_types_allowed=True)

    _pack: BoundPack | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown(cls, values: Any) -> Any:
        """A typo must not be ignored; remote-API settings (timeout, retries, keys) mean nothing locally."""
        if isinstance(values, dict):
            refuse_unknown_arguments("KVPackChatModel", cls.model_fields, values, _REMOTE_ONLY)
            values = {k: v for k, v in values.items() if k not in _REMOTE_ONLY}
            _check_constructor_options(values)
        return values

    @model_validator(mode="after")
    def _check_kb(self) -> KVPackChatModel:
        if self.kb is not None:
            self._pack = BoundPack.open(self.store, self.kb)
        return self

    @property
    def _llm_type(self) -> str:
        return "kvpack"

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL_NAME

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {  # everything that changes the output: LangChain's LLM cache keys on this
            "model": self.model_name,
            "device": self.device,  # other weights (dtype) or other arithmetic (device): other answers
            "dtype": self.dtype,
            "kb": self.kb,
            "store": self.store,
            "strategy": self.strategy,
            "packet_store": self.packet_store,
            "packet_adapter": self.packet_adapter,
            "knowledge_format": self.knowledge_format.to_dict() if self.knowledge_format else None,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,
        }

    def _get_llm_string(self, stop: list[str] | None = None, **kwargs: Any) -> str:
        """LangChain's cache key: steering a run's callback chooses changes the answer, so it counts; so do
        the model's own `stop`, which LangChain's key replaces by the call's (None when the call gives none),
        and the build of the bound pack (a rebuild with other facts keeps the name)."""
        base = super()._get_llm_string(stop=stop if stop is not None else self.stop, **kwargs)
        if self._pack is not None:  # a rebuilt pack answers from other knowledge: a cached answer is stale
            base += f"|pack_build={self._pack.manifest().build_id}"
        vectors = pending_steering(_role(kwargs))
        if not vectors:
            return base
        return base + "|steering=" + ",".join(f"{v.name}:{v.alpha:g}:{v.digest}" for v in vectors)

    def _generate_with_cache(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """LangChain keys its cache before the call and streams without the run manager: naming the run
        here makes the cache key and the call take the same run's steering."""
        with calling(run_manager.run_id if run_manager is not None else None):
            return super()._generate_with_cache(messages, stop=stop, run_manager=run_manager, **kwargs)

    async def _agenerate_with_cache(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """The async twin of `_generate_with_cache`: the cache key and the call take the same run."""
        with calling(run_manager.run_id if run_manager is not None else None):
            return await super()._agenerate_with_cache(messages, stop=stop, run_manager=run_manager, **kwargs)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """What the call runs with, as `_settings` reads it: None is the model's setting, `stop=[]` is none."""
        params = LangSmithParams(
            ls_provider="kvpack",
            ls_model_name=str(kwargs.get("model") or self.model_name),
            ls_model_type="chat",
            ls_temperature=_or_default(kwargs.get("temperature"), self.temperature),
            ls_max_tokens=_or_default(kwargs.get("max_tokens"), self.max_tokens),
        )
        effective = stop if stop is not None else self.stop
        if effective:
            params["ls_stop"] = effective
        return params

    def loaded_model(self, override: str | None = None) -> LoadedModel:
        """The weights for this instance (or a per-call `model=` override), loaded once per process."""
        if override is not None and not isinstance(override, (str, os.PathLike)):
            raise InvalidInputError(f"model must be a hub id, a model directory or a .gguf file, got {override!r}")
        return load_model(override or self.model, device=self.device, dtype=self.dtype)

    def get_token_ids(self, text: str) -> list[int]:
        """This model's tokens (LangChain's token counts, `trim_messages` ...): the default downloads GPT-2's
        tokenizer from the hub, and nothing may be downloaded at run time, and counts GPT-2's tokens."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return list(self.loaded_model().tokenizer.encode(text, add_special_tokens=False))

    def packet_composer(self, loaded: LoadedModel) -> PacketComposer:
        """This instance's packet store and adapter (the engine's defaults when neither is set)."""
        return shared_packet_composer(loaded, self.packet_store, self.packet_adapter)

    # -- requests -------------------------------------------------------------------------------------

    def _settings(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> GenerationSettings:
        def option(name: str) -> Any:  # None on a call means "this model's setting"
            value = kwargs.get(name)
            return getattr(self, name) if value is None else value

        return settings_from_options(option, stop if stop is not None else self.stop)

    def _request(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        loaded: LoadedModel,
        *,
        take_run: bool = True,
        run_id: Any = None,
    ) -> tuple[ChatRequest, list[str]]:
        """The engine request; `take_run=False` (rendering only, no model call) leaves the steering run
        pending for the call it belongs to; `run_id` (the run manager's) names the run to take."""
        kwargs = {k: v for k, v in kwargs.items() if k != "stream"}  # LangChain's own switch, already acted on
        _check_call_options(kwargs)
        translated = to_turns(messages)
        texts, handles = call_documents(kwargs.get("documents"))
        tools = _openai_tools(kwargs.get("tools"))
        names = [t["function"]["name"] for t in tools]
        schema = _response_schema(kwargs.get("response_format"))
        if take_run:
            by_role, steering_notes = steering_for_run(_role(kwargs), run_id)
        else:
            by_role, steering_notes = pending_steering(_role(kwargs)), []
        # None on a call means this model's setting, as for the decoding options
        strategy = _or_default(kwargs.get("strategy"), self.strategy)
        fmt = _or_default(kwargs.get("knowledge_format"), self.knowledge_format)
        if fmt is not None and not isinstance(fmt, KnowledgeFormat):
            raise InvalidInputError(f"knowledge_format takes a KnowledgeFormat, got {type(fmt).__name__}")
        return ChatRequest(
            turns=translated.turns,
            knowledge=texts,
            knowledge_format=fmt,
            handles=[*handles, *translated.handles],
            pack=self._pack,
            tools=tools,
            tool_choice=normalize_tool_choice(kwargs.get("tool_choice"), names),
            response_schema=schema,
            settings=self._settings(stop, kwargs),
            strategy=strategy,
            remember=self.remember,
            strict_segments=self.strict_segments,
            steering=[*_steering_option(kwargs.get("steering")), *by_role],
            # only packet requests need a composer: building one refuses models whose RoPE cannot be
            # re-rotated, which exact and text requests run on
            packets=self.packet_composer(loaded) if strategy in PACKET_STRATEGIES else None,
        ), [*translated.notes, *steering_notes]

    def _metadata(self, reply: ChatReply, model_name: str) -> tuple[UsageMetadata, dict[str, Any]]:
        usage: Usage = reply.usage
        metadata = UsageMetadata(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.input_tokens + usage.output_tokens,
            input_token_details={"cache_read": usage.cached_tokens},
        )
        response = {
            "model_name": model_name,
            "model_provider": "kvpack",
            "finish_reason": reply.finish_reason,
            "kvpack": usage.to_dict(),
            # why each invalid call is invalid, on both paths (a streamed chunk cannot carry `error`)
            "invalid_tool_call_errors": list(reply.invalid_tool_calls),
        }
        if reply.output_cut:
            response["structured_output_error"] = reply.output_cut
        return metadata, response

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        loaded = self.loaded_model(kwargs.get("model"))
        run_id = run_manager.run_id if run_manager is not None else None
        request, notes = self._request(messages, stop, kwargs, loaded, run_id=run_id)
        reply = chat(shared_engine(loaded), request)
        reply.usage.notes.extend(notes)
        _single_call(reply, kwargs)
        usage, response = self._metadata(reply, loaded.name)
        message = AIMessage(
            content=reply.text,
            tool_calls=[
                {"name": c.name, "args": c.arguments, "id": c.id, "type": "tool_call"} for c in reply.tool_calls
            ],
            invalid_tool_calls=[
                {"name": None, "args": p, "id": None, "error": p, "type": "invalid_tool_call"}  # args as streamed
                for p in reply.invalid_tool_calls
            ],
            usage_metadata=usage,
            response_metadata=response,
        )
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info={"finish_reason": reply.finish_reason})]
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        loaded = self.loaded_model(kwargs.get("model"))
        run_id = run_manager.run_id if run_manager is not None else None
        request, notes = self._request(messages, stop, kwargs, loaded, run_id=run_id)
        for delta in stream_chat(shared_engine(loaded), request):
            if delta.reply is None:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta.text))
                if run_manager is not None:
                    run_manager.on_llm_new_token(delta.text, chunk=chunk)
                yield chunk
                continue
            reply = delta.reply
            reply.usage.notes.extend(notes)
            _single_call(reply, kwargs)
            usage, response = self._metadata(reply, loaded.name)
            chunks = [
                tool_call_chunk(name=c.name, args=_json(c.arguments), id=c.id, index=i)
                for i, c in enumerate(reply.tool_calls)
            ]
            # unusable calls: args that do not parse become `invalid_tool_calls` when chunks are merged
            chunks += [
                tool_call_chunk(name=None, args=problem, id=None, index=len(chunks) + i)
                for i, problem in enumerate(reply.invalid_tool_calls)
            ]
            last = AIMessageChunk(
                content=delta.text,
                tool_call_chunks=chunks,
                usage_metadata=usage,
                response_metadata=response,
                chunk_position="last",
            )
            chunk = ChatGenerationChunk(message=last, generation_info={"finish_reason": reply.finish_reason})
            if run_manager is not None and delta.text:
                run_manager.on_llm_new_token(delta.text, chunk=chunk)
            yield chunk

    # -- tools and structured output ------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (LangChain tools, functions, pydantic models or OpenAI dicts) for this model's calls.

        `tool_choice`: None/"auto" (the model decides), "none", "any"/"required"/True (a call is forced
        and written under schema guidance), or a tool name (that tool is forced).
        """
        # a bad option fails here, not at the first call deep inside a graph (LangChain's own tracing key
        # is taken off before the call)
        _check_call_options({k: v for k, v in kwargs.items() if k != "ls_structured_output_format"})
        formatted = _openai_tools(tools)
        names = list(tool_parameters(formatted))  # refuses schemas the model cannot call, naming the tool
        choice = normalize_tool_choice(tool_choice, names)
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Output that validates against `schema` (pydantic class, TypedDict or JSON schema).

        All three methods are schema-guided: the engine writes the JSON structure and the model fills
        in the values. `json_mode` without a schema produces a free-form JSON object.
        """
        if kwargs:
            raise InvalidInputError(f"unknown arguments: {', '.join(sorted(kwargs))}")
        if method not in _STRUCTURED_METHODS:
            raise InvalidInputError(f"unknown method {method!r}: use one of {', '.join(_STRUCTURED_METHODS)}")
        if schema is None and method != "json_mode":
            raise InvalidInputError(f"method={method!r} needs a schema")
        target: Any = schema
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)  # pydantic v2 or v1
        try:  # LangChain's converters raise bare errors (a string or a number is read as a function)
            if schema is not None and not isinstance(schema, (dict, type)):
                raise TypeError(f"got a {type(schema).__name__}")
            ls_format = {"kwargs": {"method": method}, "schema": _tracing_schema(schema)}
            if method == "function_calling":
                name = convert_to_openai_tool(target)["function"]["name"]
            else:
                json_schema = _json_schema(schema) if schema is not None else dict(FREE_FORM_JSON)
        except (ValueError, TypeError) as exc:
            named = " with a 'title' (a tool needs a name; method='json_schema' takes any)"
            named = named if method == "function_calling" else ""
            raise InvalidInputError(
                f"method={method!r} takes a pydantic class, a TypedDict or a JSON schema dict{named}, not {schema!r}: "
                f"{exc}"
            ) from exc
        parser: Runnable
        if method == "function_calling":
            llm = self.bind_tools([target], tool_choice=name, ls_structured_output_format=ls_format)
            parser = (
                PydanticToolsParser(tools=[target], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        else:
            try:  # any schema, an enum or array root too: it is the reply's shape, not a call's arguments
                check_schema(json_schema)
            except InvalidInputError as exc:
                raise InvalidInputError(f"the structured output schema cannot be decoded: {exc}") from exc
            llm = self.bind(response_format=json_schema, ls_structured_output_format=ls_format)
            parser = PydanticOutputParser(pydantic_object=target) if is_pydantic else JsonOutputParser()
        parser = RunnableLambda(_refuse_cut_output) | parser
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


def _refuse_cut_output(message: BaseMessage) -> BaseMessage:
    """Structured output the token budget cut is refused, not parsed: past the budget the engine makes the
    remaining choices, so the values are cut short or placeholders that would still validate (a forced call
    cut so is an invalid call: no call to parse). With `include_raw` the refusal is the `parsing_error`."""
    metadata = message.response_metadata
    reason = metadata.get("structured_output_error") or next(iter(metadata.get("invalid_tool_call_errors") or ()), "")
    if reason:
        raise InvalidInputError(reason)
    return message


def _json_schema(schema: dict | type) -> dict[str, Any]:
    """A plain JSON schema from a pydantic class, TypedDict, OpenAI tool dict or JSON schema."""
    if isinstance(schema, dict) and not _tool_shaped(schema):  # any JSON schema: a root anyOf, $ref ... as given
        return dict(schema)
    return convert_to_openai_tool(schema)["function"].get("parameters", {"type": "object", "properties": {}})


_SCHEMA_KEYWORDS = {"type", "properties", "required", "anyOf", "oneOf", "allOf", "$ref", "enum", "const", "items"}


def _tool_shaped(schema: dict) -> bool:
    """An OpenAI (`function`, or `name` + `parameters`), Anthropic (`input_schema`) or Bedrock (`toolSpec`)
    tool dict, or a dict with no JSON-schema keyword at all: LangChain's converter reads those."""
    keys = set(schema)
    if keys & {"function", "input_schema", "toolSpec"} or {"name", "parameters"} <= keys:
        return True
    return not keys & _SCHEMA_KEYWORDS


def _tracing_schema(schema: dict | type | None) -> dict[str, Any] | None:
    """The schema as LangChain's tracing expects it (it refuses untitled JSON schemas; ours do not)."""
    if schema is None:
        return None
    try:
        return convert_to_json_schema(schema)
    except ValueError:
        return _json_schema(schema)


def _response_schema(response_format: Any) -> Any:
    """Our plain JSON schema from a `response_format`, including OpenAI's wrapped shapes."""
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        wrapped = response_format.get("json_schema")
        if not isinstance(wrapped, dict) or not isinstance(wrapped.get("schema"), dict):
            raise InvalidInputError("response_format of type json_schema needs json_schema.schema")
        return wrapped["schema"]
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        return dict(FREE_FORM_JSON)
    if response_format is not None and not isinstance(response_format, dict):
        if not isinstance(response_format, type):  # LangChain's converter reads "json" as a function, raw
            raise InvalidInputError(
                f"response_format takes a JSON schema, an OpenAI response format, a pydantic class or a TypedDict, "
                f"got {response_format!r}"
            )
        try:
            return _json_schema(response_format)  # a pydantic class or TypedDict
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"response_format {response_format!r} is not a schema: {exc}") from exc
    return response_format


def _steering_option(value: Any) -> list[SteeringVector]:
    """`steering=` on a call or in `bind`: one vector or a list of them."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]  # anything else is refused below
    if not all(isinstance(v, SteeringVector) for v in items):
        raise InvalidInputError("steering= takes SteeringVector objects (build them with kvpack steer build)")
    return items


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _check_constructor_options(values: Mapping[str, Any]) -> None:
    """The decoding options given at construction, checked as a call's are (by name, never coerced): pydantic
    would make `max_tokens=True` one token and `"5"` five."""
    given = {name: values[name] for name in _CALL_OPTIONS if values.get(name) is not None}
    for name, value in given.items():
        if name in ("max_tokens", "top_k", "seed"):
            checked_integer(name, value)
        else:
            checked_number(name, value)


def _check_call_options(kwargs: Mapping[str, Any]) -> None:
    """Unknown call options are refused, and so are values of the wrong type that would be read as something
    else (`parallel_tool_calls="false"` allowed parallel calls)."""
    unknown = set(kwargs) - _CALL_KEYS
    if unknown:
        raise InvalidInputError(f"unknown call options: {', '.join(sorted(unknown))}")
    parallel = kwargs.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidInputError(f"parallel_tool_calls must be True or False, got {parallel!r}")
    _role(kwargs)


def _role(kwargs: Mapping[str, Any]) -> str | None:
    """The call's agent role (a name: a list failed unhashable deep in the steering callback)."""
    role = kwargs.get(ROLE_KEY)
    if role is not None and not isinstance(role, str):
        raise InvalidInputError(f"{ROLE_KEY} must be a role name (a string), got {role!r}")
    return role


def _or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _openai_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools as OpenAI function specs; LangChain's converter raises bare ValueErrors, and reads a string as
    a list of one-letter tools."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise InvalidInputError(f"tools= takes a list of tools, got {type(tools).__name__}")
    formatted = []
    for i, tool in enumerate(tools):
        try:
            formatted.append(convert_to_openai_tool(tool))
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(
                f"tool {i} is not a LangChain tool, function, pydantic class or tool dict: {exc}"
            ) from exc
    return formatted


def _single_call(reply: ChatReply, kwargs: Mapping[str, Any]) -> None:
    """`parallel_tool_calls=False`: only the reply's first call is made (on every path, streaming too)."""
    if kwargs.get("parallel_tool_calls") is False and len(reply.tool_calls) > 1:
        dropped = [c.name for c in reply.tool_calls[1:]]
        reply.tool_calls = reply.tool_calls[:1]
        reply.usage.notes.append(f"parallel_tool_calls=False: only the first call was kept (dropped: {dropped})")
