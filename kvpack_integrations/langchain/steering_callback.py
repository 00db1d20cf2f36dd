"""`KVPackSteeringCallback`: steering vectors per agent role, found by `KVPackChatModel` among a run's callbacks.

Why a callback: in LangChain and LangGraph the natural place for per-run context is the config
(`callbacks`, `metadata`), which flows from a graph node down to every model call inside it. One model
and one knowledge base can then serve several roles, each steered its own way:

    steer = KVPackSteeringCallback(roles={"reviewer": strict + formal, "writer": friendly})
    model.invoke(messages, config={"callbacks": [steer], "metadata": {"agent_role": "reviewer"}})

The role comes from `bind(agent_role=...)` first, else from the run's metadata `agent_role`. A role
without a vector runs unsteered (the usage report says so). No KV work happens here: the vectors go
into the engine request, which applies them to the request's private cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

from ..errors import InvalidInputError
from ..steering.vector import SteeringVector

ROLE_KEY = "agent_role"


class _Run:
    """The steering of one chat model run (LangChain's run id, the callback, the run's metadata role);
    `taken` once a model call claimed it, `ended` once the run is over."""

    def __init__(self, callback: KVPackSteeringCallback, role: str | None, run_id: Any) -> None:
        self.callback, self.role, self.run_id = callback, role, run_id
        self.taken = self.ended = False

    @property
    def open(self) -> bool:
        return not (self.taken or self.ended)


# Runs of `KVPackChatModel` started by the callback (runs of other chat models are never steered, so never
# recorded), in the context the model's code then runs in (the handler runs inline; worker threads and
# tasks copy the context): `BaseChatModel.stream` does not hand the run manager to `_stream`, so the
# run's callbacks and metadata cannot be read from it there. The variable holds a tuple, replaced (never
# changed in place) at each start, so contexts copied earlier (other threads, other tasks) never see this
# context's runs; the runs themselves are shared objects, so a call in a copied context can claim one and
# an end in a copied context can close one. A model call whose run id is known (the run manager's, or
# `_CALLING`, set by `KVPackChatModel` around LangChain's cache lookup and call) takes that run and no
# other; only `stream`, which knows no id, takes the oldest open run (its own, started just before).
_PENDING: ContextVar[tuple[_Run, ...]] = ContextVar("kvpack_steering", default=())
_CALLING: ContextVar[Any] = ContextVar("kvpack_steering_call", default=None)


class KVPackSteeringCallback(BaseCallbackHandler):
    """Role name -> steering vector(s); `applied` records (role, vector names) per steered call."""

    run_inline = True  # async runs call it in the event loop's context, not a copy in a worker thread

    def __init__(self, roles: Mapping[str, SteeringVector | Sequence[SteeringVector]]) -> None:
        if not isinstance(roles, Mapping) or not roles:
            raise InvalidInputError("KVPackSteeringCallback needs roles={'role': SteeringVector, ...}")
        self.roles: dict[str, tuple[SteeringVector, ...]] = {}
        for role, vectors in roles.items():
            items = (vectors,) if isinstance(vectors, SteeringVector) else tuple(vectors)
            if not isinstance(role, str) or not role or not all(isinstance(v, SteeringVector) for v in items):
                raise InvalidInputError(f"role {role!r}: expected a name and SteeringVector(s), got {vectors!r}")
            self.roles[role] = items
        self.applied: list[tuple[str, tuple[str, ...]]] = []

    def vectors_for(self, role: str | None) -> tuple[SteeringVector, ...]:
        return self.roles.get(role, ()) if role else ()

    def on_chat_model_start(
        self, serialized: Any, messages: Any, *, run_id: Any = None, metadata: Any = None, **kwargs: Any
    ) -> None:
        still_open = tuple(run for run in _PENDING.get() if run.open)
        if _is_kvpack(serialized, kwargs.get("invocation_params")):
            still_open = (*still_open, _Run(self, (metadata or {}).get(ROLE_KEY), run_id))
        _PENDING.set(still_open)

    def on_llm_end(self, response: Any, *, run_id: Any = None, **kwargs: Any) -> None:
        _end(run_id)

    def on_llm_error(self, error: BaseException, *, run_id: Any = None, **kwargs: Any) -> None:
        _end(run_id)


def _is_kvpack(serialized: Any, params: Any) -> bool:
    """Whether a starting run is a `KVPackChatModel`'s (by its `_llm_type`, else its class path): another
    model's run must leave nothing behind for a later KVPack call to take."""
    if isinstance(params, Mapping) and "_type" in params:
        return params["_type"] == "kvpack"
    ident = serialized.get("id") if isinstance(serialized, Mapping) else None
    return isinstance(ident, list) and bool(ident) and ident[-1] == "KVPackChatModel"


@contextmanager
def calling(run_id: Any) -> Iterator[None]:
    """Within: the model call (LangChain's cache lookup, then the call) belongs to run `run_id`."""
    token = _CALLING.set(run_id)
    try:
        yield
    finally:
        _CALLING.reset(token)


def _end(run_id: Any) -> None:
    for run in _PENDING.get():
        if run.run_id == run_id:
            run.ended = True


def _run_for(run_id: Any) -> _Run | None:
    """The open run a call with `run_id` takes: that run alone (None if it has none); without an id from
    the caller or `calling`, the oldest open run."""
    run_id = run_id if run_id is not None else _CALLING.get()
    if run_id is not None:
        return next((run for run in _PENDING.get() if run.run_id == run_id and run.open), None)
    return next((run for run in _PENDING.get() if run.open), None)


def _resolve(run: _Run | None, role: str | None) -> tuple[str | None, tuple[SteeringVector, ...], list[str]]:
    if run is None:
        note = f"agent role {role!r} given but no KVPackSteeringCallback is attached to the run: unsteered"
        return role, (), [note] if role else []
    role = role or run.role
    vectors = run.callback.vectors_for(role)
    if not vectors:
        known = ", ".join(run.callback.roles)
        return role, (), [f"steering callback attached but role {role!r} has no vector (roles: {known}): unsteered"]
    return role, vectors, [f"agent role {role!r} steered"]


def steering_for_run(role: str | None, run_id: Any = None) -> tuple[tuple[SteeringVector, ...], list[str]]:
    """Vectors for the chat model call now running, which takes its run: the run `run_id` names (from the
    run manager, where LangChain passes one, else from `calling`) and no other, else the oldest open one;
    its role is `role` (from bind), else the run metadata's. By id, a batch whose earlier prompts were
    answered from LangChain's cache (their runs stay open until the batch ends) still steers each call
    by its own run, and a call with no steering callback attached takes no one else's run."""
    run = _run_for(run_id)
    if run is not None:
        run.taken = True
    role, vectors, notes = _resolve(run, role)
    if run is not None and vectors:
        run.callback.applied.append((str(role), tuple(v.name for v in vectors)))
    return vectors, notes


def pending_steering(role: str | None, run_id: Any = None) -> tuple[SteeringVector, ...]:
    """The vectors the model call will take, without taking them (LangChain's cache key): the same run
    as `steering_for_run` picks, so an answer is cached under the steering it was made with."""
    return _resolve(_run_for(run_id), role)[1]
