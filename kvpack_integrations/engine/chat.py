"""One chat request, end to end: render once, reuse cached prefixes, decode (free, tool call or JSON).

Integrations (LangChain, LlamaIndex) translate their objects into a `ChatRequest` and a `ChatReply`
back; everything about caches, templates, tools and guided decoding happens here or below.

Every prompt is remembered in the engine's prefix tree (exact strategy), so the next step of an agent
loop, whose prompt extends this one, prefills only the tokens that are new to the conversation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from ..knowledge.bound import BoundPack
from ..packet.composer import PacketComposer
from ..packet.layout import PacketPrompt
from ..prompts.call_format import HERMES, CallFormat, native_call_format
from ..prompts.conversation import ChatTurn, ConversationPrompt, render_conversation
from ..prompts.knowledge import KnowledgeFormat
from ..segments.handles import SegmentHandle
from ..steering.vector import SteeringVector
from .engine import Engine, Prefilled
from .json_decoding import GuidedDecoder, check_schema, decode_json, only_objects
from .settings import GenerationSettings
from .stored_handles import check_stored_handles
from .tool_calls import ParsedToolCall, call_text, new_call_id, parse_tool_calls
from .usage import Usage

TOOL_CHOICES = ("auto", "none", "required")
REQUEST_STRATEGIES = ("exact", "text", "packet", "blend")
PACKET_STRATEGIES = frozenset({"packet", "blend"})  # knowledge composed from stored packets (approximate)
FREE_FORM_JSON: Mapping[str, Any] = {"type": "object"}


@dataclass
class ChatRequest:
    """What to ask. `tools` are OpenAI-style function specs; `tool_choice` is auto, none, required or a name."""

    turns: Sequence[ChatTurn]
    knowledge: Sequence[str] = ()
    knowledge_format: KnowledgeFormat | None = None
    handles: Sequence[SegmentHandle] = ()
    pack: BoundPack | None = None
    tools: Sequence[Mapping[str, Any]] = ()
    tool_choice: str = "auto"
    response_schema: Mapping[str, Any] | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    strategy: str = "exact"
    remember: bool = True
    strict_segments: bool = False
    steering: Sequence[SteeringVector] = ()
    packets: PacketComposer | None = None  # for strategy packet/blend; None: the engine's

    def __post_init__(self) -> None:
        """A bad strategy fails where the request is made, not at the first streamed chunk."""
        if self.strategy not in REQUEST_STRATEGIES:
            raise InvalidInputError(f"unknown strategy {self.strategy!r}: use one of {', '.join(REQUEST_STRATEGIES)}")


@dataclass
class ChatReply:
    text: str
    tool_calls: list[ParsedToolCall]
    invalid_tool_calls: list[str]
    usage: Usage
    finish_reason: str
    parsed: Any = None
    output_cut: str = ""  # why a structured reply is not the model's (the budget ran out before its last choice)


@dataclass
class ChatDelta:
    """A streamed piece of text; the last delta carries the whole reply."""

    text: str
    reply: ChatReply | None = None


def tool_parameters(tools: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Tool name -> JSON-schema parameters, refusing malformed specs and schemas we cannot decode."""
    out: dict[str, Mapping[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"tool {i} is not an OpenAI-style function spec with a name")
        params = function.get("parameters") or {"type": "object", "properties": {}}  # type: ignore[union-attr]
        if name in out:  # the same tool given twice (e.g. a pydantic class and its schema) is one tool
            if _without_annotations(out[name]) != _without_annotations(params):
                raise InvalidInputError(f"two different tools are named {name!r}")
            continue
        try:
            check_schema(params)
        except InvalidInputError as exc:
            raise InvalidInputError(f"tool {name!r} cannot be called by this model: {exc}") from exc
        if not only_objects(params):
            raise InvalidInputError(
                f"tool {name!r} cannot be called: its parameters must be a JSON object schema (a call's arguments "
                f"are named), got {json.dumps(params)[:200]}"
            )
        out[name] = params
    return out


def _without_annotations(schema: Any) -> Any:
    """A schema without titles and descriptions, to tell the same tool given twice from two tools."""
    if isinstance(schema, Mapping):
        return {k: _without_annotations(v) for k, v in schema.items() if k not in ("title", "description")}
    if isinstance(schema, list):
        return [_without_annotations(v) for v in schema]
    return schema


def _validate(request: ChatRequest, params: Mapping[str, Mapping[str, Any]]) -> None:
    choice = request.tool_choice
    if choice not in TOOL_CHOICES and choice not in params:
        known = ", ".join(params) or "no tools are bound"
        raise InvalidInputError(f"tool_choice {choice!r} is neither auto/none/required nor a bound tool ({known})")
    if choice == "required" and not params:
        raise InvalidInputError("tool_choice='required' needs at least one bound tool")
    if request.response_schema is not None:
        check_schema(request.response_schema)
        if params and choice != "none":
            raise InvalidInputError(
                "a response schema and callable tools were both given: ask for structured output or for tool "
                "calls (tool_choice='none' keeps the tools in the prompt)"
            )


def prepare(engine: Engine, request: ChatRequest) -> tuple[ConversationPrompt, list[str], float]:
    """Render the request and make sure a bound pack is resident; returns (prompt, notes, start time)."""
    t0 = time.perf_counter()
    notes = check_stored_handles(
        engine,
        request.handles,
        request.knowledge,
        strict=request.strict_segments,
        # stored segments matter where caches are reused as they are; under strict, for every strategy
        verify=request.strategy == "exact" or request.strict_segments,
        open_pack=request.pack is None and request.strategy == "exact",
        knowledge_format=request.knowledge_format,
    )
    knowledge = list(request.knowledge)
    fmt = request.knowledge_format
    if request.pack is not None:
        if request.strategy == "exact" and request.pack.ensure_resident(engine.loaded, engine.tree):
            notes.append(f"knowledge base {request.pack.name!r} loaded from {request.pack.store.root}")
        manifest = request.pack.manifest()
        if fmt is not None and fmt != manifest.knowledge_format:
            raise InvalidInputError(
                f"knowledge base {request.pack.name!r} lays out its facts as {manifest.knowledge_format.to_dict()}, "
                f"and this request asks for {fmt.to_dict()}: one system message has one layout; leave "
                "knowledge_format unset (the pack's is used) or give the pack's"
            )
        knowledge = list(manifest.facts) + knowledge
        fmt = manifest.knowledge_format
    # tools stay in the prompt under tool_choice="none" (only calls are off), so the prefix is unchanged
    prompt = render_conversation(
        engine.loaded.tokenizer, request.turns, knowledge=knowledge, knowledge_format=fmt, tools=request.tools
    )
    if request.pack is not None and request.strategy == "exact":
        missed = request.pack.prefix_note(prompt.token_ids)
        if missed is not None:
            notes.append(missed)
    return prompt, [*notes, *prompt.notes], t0


def stream_chat(engine: Engine, request: ChatRequest) -> Iterator[ChatDelta]:
    """Answer `request`, yielding text as it is decoded (free text only; guided modes yield once).

    The engine's lock covers rendering, composing, prefilling and remembering the prompt (everything
    that reads or writes the shared prefix tree); decoding runs on the request's own cache after it.
    """
    params = tool_parameters(request.tools)
    _validate(request, params)
    with engine.lock:
        prompt, notes, t0 = prepare(engine, request)
        if request.strategy in PACKET_STRATEGIES:
            state = _prefill_packets(engine, request, prompt, t0)
        else:
            state = engine.prefill(
                prompt.token_ids,
                request.settings,
                strategy=request.strategy,
                started_at=t0,
                remember_prompt=request.remember and request.strategy == "exact",
                steering=request.steering,
            )
    state.usage.notes[:0] = notes
    forced = request.tool_choice if request.tool_choice not in ("auto", "none") else None
    # text streams as decoded only when it is the reply itself: calls and JSON come whole, in the last delta
    streamed = forced is None and request.response_schema is None and (not params or request.tool_choice == "none")
    if request.settings.stop and (forced is not None or request.response_schema is not None):
        state.usage.notes.append(
            "stop sequences do not apply to a forced tool call or structured output: cut at one, its JSON would "
            "not parse (max_tokens still does)"
        )
    if forced is not None:
        tokenizer = engine.loaded.tokenizer
        fmt = native_call_format(tokenizer, request.tools) if prompt.native_tools else HERMES
        reply = _forced_tool_call(engine, state, request, params, forced, fmt)
    elif request.response_schema is not None:
        result = decode_json(engine, state, request.response_schema, request.settings)
        reply = ChatReply(result.text, [], [], result.usage, result.finish_reason, parsed=result.value)
        if not result.complete:
            reply.output_cut = (
                "max_tokens ran out while the model wrote the structured output: the values written after it are "
                "cut short or placeholders the engine chose to keep the JSON valid; raise max_tokens"
            )
            result.usage.notes.append(reply.output_cut)
    else:
        reply = yield from _free_text(engine, state, request.settings, params, streamed)
    yield ChatDelta(text="" if streamed else reply.text, reply=reply)


def _prefill_packets(engine: Engine, request: ChatRequest, prompt: ConversationPrompt, t0: float) -> Prefilled:
    """Knowledge documents composed from their packets (re-rotated, not recomputed), the rest prefilled."""
    if not prompt.knowledge_cuts:
        raise InvalidInputError(
            f"strategy {request.strategy!r} composes knowledge documents from packets, and this request has none "
            "that can be cut out: bind a knowledge pack or pass documents, with a knowledge format that has an "
            "instruction"
        )
    split = PacketPrompt.from_cuts(prompt.token_ids, prompt.knowledge_cuts)
    composer = request.packets or engine.packets
    composition = composer.compose(engine, split, request.strategy)
    return engine.prefill(
        list(split.tail),
        request.settings,
        composed=composition.composed,
        started_at=t0,
        steering=request.steering,
    )


def chat(engine: Engine, request: ChatRequest) -> ChatReply:
    """`stream_chat` run to the end."""
    reply = None
    for delta in stream_chat(engine, request):
        reply = delta.reply or reply
    assert reply is not None
    return reply


def _free_text(
    engine: Engine,
    state: Prefilled,
    settings: GenerationSettings,
    params: Mapping[str, Mapping[str, Any]],
    streamed: bool,
) -> Generator[ChatDelta, None, ChatReply]:
    """Plain decoding; unless `streamed` (tools offered), the reply is parsed, with repair, for tool calls."""
    parts: list[str] = []
    ids: list[int] = []
    usage: Usage | None = None
    finish = "length"
    for chunk in engine.decode(state, settings):
        parts.append(chunk.text)
        if chunk.token_id is not None:
            ids.append(chunk.token_id)
        if streamed and chunk.text:
            yield ChatDelta(text=chunk.text)
        if chunk.usage is not None:
            usage, finish = chunk.usage, chunk.finish_reason or finish
    assert usage is not None
    text = "".join(parts)
    if streamed:
        return ChatReply(text, [], [], usage, finish)
    try:
        reply_text = call_text(engine.loaded.tokenizer, ids, text)
        content, calls, problems = parse_tool_calls(reply_text, params, cut=finish == "length")
    except (TypeError, ValueError, RecursionError) as exc:  # degenerate output must not fail the request
        content, calls, problems = text, [], [f"the reply could not be parsed for tool calls: {exc}"]
    return ChatReply(content, calls, problems, usage, "tool_calls" if calls else finish)


def _forced_tool_call(
    engine: Engine,
    state: Prefilled,
    request: ChatRequest,
    params: Mapping[str, Mapping[str, Any]],
    forced: str,
    fmt: CallFormat,
) -> ChatReply:
    """A call is required: the engine writes the call's structure in the template's own format (`fmt`:
    what the next step renders for it), the model picks tool and values.

    A call the token budget cut is not a call: past the budget the decoder makes the remaining choices
    without the model, so its values are cut short or placeholders, and an agent would run it. It is an
    invalid call with the reason instead (`finish_reason="length"`), as a free-text call cut by the budget
    is. Only the closing markup past the budget (the engine's to write, no choice left in it) leaves the
    call whole.
    """
    names = list(params) if forced == "required" else [forced]
    decoder = GuidedDecoder(engine, state, request.settings)
    decoder.emit(fmt.opening())
    name = names[decoder.choose([_json_string(n) for n in names])]
    decoder.emit(fmt.between())
    arguments = decoder.value(params[name])
    # the budget is only ever spent, so one not spent here was there for every choice: tool, values, the end
    cut = decoder.truncated or decoder.exhausted
    call_id = new_call_id()
    decoder.emit(fmt.closing(call_id))
    usage = decoder.finish_usage()
    if cut:
        problem = (
            f"max_tokens ran out while the model wrote the call to {name!r}: its arguments would be cut short "
            "or placeholders, so it is not returned as a call; raise max_tokens"
        )
        usage.notes.append(problem)
        return ChatReply("", [], [problem], usage, "length")
    if decoder.truncated:
        usage.notes.append(
            f"the model wrote the whole call to {name!r}; its closing markup, written by the engine, went past "
            "max_tokens"
        )
    call = ParsedToolCall(name=name, arguments=dict(arguments), id=call_id)
    return ChatReply("", [call], [], usage, "tool_calls")


def _json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
