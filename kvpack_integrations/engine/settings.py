"""Decoding settings."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

from ..errors import InvalidInputError


@dataclass(frozen=True)
class GenerationSettings:
    """`temperature=0` is greedy decoding; a `seed` makes sampling reproducible."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string is one stop sequence, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        for name in ("max_new_tokens", "top_k"):  # 2.5 tokens failed deep in decoding, unnamed
            checked_integer(name, getattr(self, name))
        if self.seed is not None:
            checked_integer("seed", self.seed)
        for name in ("temperature", "top_p"):  # NaN passes every comparison below, then breaks sampling
            if not math.isfinite(checked_number(name, getattr(self, name))):
                raise InvalidInputError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k must be >= 0, got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidInputError("stop sequences must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def checked_integer(name: str, value: Any) -> int:
    """A caller's option checked, not coerced, under the name the caller used: int("many") fails unnamed,
    and int(2.7) and int(True) pass silently (GenerationSettings checks the ranges)."""
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    return int(value)


def refuse_unknown_arguments(
    owner: str, fields: Mapping[str, Any], values: Mapping[str, Any], allowed: Collection[str] = ()
) -> None:
    """A constructor's arguments that are neither fields (nor their aliases) nor `allowed` are refused by name:
    a typo (`top_k=` for `k=`, `search_kwargs=`) must not be ignored silently."""
    known = set(fields) | {f.alias for f in fields.values() if getattr(f, "alias", None)} | set(allowed)
    unknown = set(values) - known
    if unknown:
        raise InvalidInputError(f"{owner} got unknown arguments: {', '.join(sorted(unknown))}")


def checked_number(name: str, value: Any) -> float:
    """`checked_integer` for real numbers (a bool is not one)."""
    if not isinstance(value, Real) or isinstance(value, bool):
        raise InvalidInputError(f"{name} must be a number, got {value!r}")
    return float(value)


def checked_stop(value: Any) -> tuple[str, ...]:
    """A string is one stop sequence; a list holds several (a non-string among them is refused by name)."""
    stops = (value,) if isinstance(value, str) else value or ()
    if not isinstance(stops, Sequence) or any(not isinstance(s, str) for s in stops):
        raise InvalidInputError(f"stop must be a string or a list of strings, got {value!r}")
    return tuple(stops)


def settings_from_options(option: Callable[[str], Any], stop: Any) -> GenerationSettings:
    """Decoding settings from options under the names LangChain and LlamaIndex callers use (`max_tokens`,
    `temperature`, `top_p`, `top_k`, `seed`; `option(name)` gives a call's value, else the model's),
    each checked by that name, never coerced."""
    seed = option("seed")
    max_tokens = checked_integer("max_tokens", option("max_tokens"))
    if max_tokens < 1:  # by the caller's name: the engine's is max_new_tokens
        raise InvalidInputError(f"max_tokens must be >= 1, got {max_tokens}")
    return GenerationSettings(
        max_new_tokens=max_tokens,
        temperature=checked_number("temperature", option("temperature")),
        top_p=checked_number("top_p", option("top_p")),
        top_k=checked_integer("top_k", option("top_k")),
        seed=None if seed is None else checked_integer("seed", seed),
        stop=checked_stop(stop),
    )
