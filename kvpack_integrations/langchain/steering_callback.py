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

from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

from ..errors import InvalidInputError
from ..steering.vector import SteeringVector

ROLE_KEY = "agent_role"


class _Run:
    """The steering of one chat model run; `live` turns off when the run ends."""

    def __init__(self, callback: KVPackSteeringCallback, role: str | None) -> None:
        self.callback, self.role, self.live = callback, role, True


# Set by the callback when a chat model run starts, in the context the model's code then runs in (the
# handler runs inline; worker threads and tasks copy the context): `BaseChatModel.stream` does not hand
# the run manager to `_stream`, so the run's callbacks and metadata cannot be read from it there. The
# run ends in a task that may hold only a copy of that context, so ending flips the shared object's
# `live` flag instead of resetting the variable.
_ACTIVE: ContextVar[_Run | None] = ContextVar("kvpack_steering", default=None)


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

    def on_chat_model_start(self, serialized: Any, messages: Any, *, metadata: Any = None, **kwargs: Any) -> None:
        _ACTIVE.set(_Run(self, (metadata or {}).get(ROLE_KEY)))

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        _end_run()

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        _end_run()


def _end_run() -> None:
    run = _ACTIVE.get()
    if run is not None:
        run.live = False


def steering_for_run(role: str | None) -> tuple[tuple[SteeringVector, ...], list[str]]:
    """Vectors for the running chat model call: its role (`role` from bind, else the run metadata's)."""
    run = _ACTIVE.get()
    if run is None or not run.live:
        return (), []
    callback = run.callback
    role = role or run.role
    vectors = callback.vectors_for(role)
    if not vectors:
        known = ", ".join(callback.roles)
        return (), [f"steering callback attached but role {role!r} has no vector (roles: {known}): unsteered"]
    callback.applied.append((str(role), tuple(v.name for v in vectors)))
    return vectors, [f"agent role {role!r} steered"]
