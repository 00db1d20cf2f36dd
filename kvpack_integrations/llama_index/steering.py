"""Steering for LlamaIndex: vectors on the LLM, per call, and per agent role.

LangChain carries per-run context in a callback config; LlamaIndex has no such channel into an LLM
call, and a multi-agent `AgentWorkflow` gives every agent its own `llm`. So the idiomatic form is a
role mapping on the LLM plus a role-bound copy per agent:

    llm = KVPackLLM(roles={"support": formal, "engineer": defensive + docstrings})
    support = FunctionAgent(name="support", llm=llm.for_role("support"), ...)

All copies share one engine and one prefix tree (one per loaded model). A call may also pass
`steering=[...]` or `agent_role="..."`. No KV work happens here: the vectors go into the engine
request, which applies them to the request's private cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidInputError
from ..steering.vector import SteeringVector

ROLE_KEY = "agent_role"


def steering_list(value: Any, where: str = "steering") -> list[SteeringVector]:
    """One vector or a sequence of them (None: none)."""
    if value is None:
        return []
    items = [value] if isinstance(value, SteeringVector) else list(value) if isinstance(value, Sequence) else [value]
    if not all(isinstance(v, SteeringVector) for v in items):
        raise InvalidInputError(f"{where} takes SteeringVector objects (build them with kvpack steer build)")
    return items


def role_mapping(value: Any) -> dict[str, tuple[SteeringVector, ...]]:
    """`roles={"name": vector or [vectors]}` checked: names are non-empty strings, values vectors."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInputError("roles takes a mapping {'role': SteeringVector or [SteeringVector, ...]}")
    out: dict[str, tuple[SteeringVector, ...]] = {}
    for role, vectors in value.items():
        if not isinstance(role, str) or not role:
            raise InvalidInputError(f"role names must be non-empty strings, got {role!r}")
        out[role] = tuple(steering_list(vectors, f"roles[{role!r}]"))
    return out


def vectors_for_role(
    roles: Mapping[str, Sequence[SteeringVector]], role: str | None
) -> tuple[list[SteeringVector], list[str]]:
    """The vectors of `role` and a note; a role without vectors runs unsteered, and the note says so."""
    if role is None:
        return [], []
    if not isinstance(role, str) or not role:
        raise InvalidInputError(f"agent_role must be a non-empty string, got {role!r}")
    vectors = list(roles.get(role, ()))
    if not vectors:
        known = ", ".join(roles) or "none are configured"
        return [], [f"agent role {role!r} has no steering vector (roles: {known}): unsteered"]
    return vectors, [f"agent role {role!r} steered"]
