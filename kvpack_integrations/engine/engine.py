"""The generation engine: compose a cache, prefill what is new, decode, and account for it.

Stored caches are never handed to the model: composition always builds a fresh cache from copies,
so decoding can grow it freely.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, TypeVar, cast

import torch
from transformers import DynamicCache

from ..composition.cache_ops import (
    check_context_window,
    check_rope_regime,
    check_sliding_window,
    empty_cache,
    forward,
    segments_from_cache,
)
from ..composition.composed import ComposedCache
from ..composition.exact import compose_exact, materialize
from ..composition.radix_tree import RadixTree
from ..errors import CompositionError, InvalidInputError
from ..packet.composer import PacketComposer
from ..runtime.loader import LoadedModel
from ..segments.segment import KVSegment
from ..steering.apply import DEFAULT_LIMIT as DEFAULT_STEERING_LIMIT
from ..steering.apply import steer_values
from ..steering.vector import SteeringVector, combined
from .sampling import make_generator, next_token
from .settings import GenerationSettings
from .text_stream import TextStream
from .usage import GenerationResult, StreamChunk, Usage

STRATEGIES = ("exact", "text")
# caches that do not cover the prompt's own first tokens: the whole prompt is prefilled on top of them
APPENDED_STRATEGIES = frozenset({"naive", "packet", "rerotated", "blend", "epic"})


@dataclass
class Prefilled:
    """A prompt prefilled on a fresh cache: the logits for the first new token and the usage so far."""

    cache: DynamicCache
    logits: torch.Tensor
    usage: Usage
    started_at: float


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _holding_lock(method: _Method) -> _Method:
    """Run an engine method under `engine.lock`: it reads or writes the shared prefix tree, and the engine
    is shared by every caller of a model, not only the chat path (which already holds the lock)."""

    @functools.wraps(method)
    def locked(self: Engine, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return cast(_Method, locked)


class Engine:
    """Generation on one loaded model with an in-memory prefix cache (a radix tree of segments)."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_cached_tokens: int | None = 65536,
        steering_limit: float | None = DEFAULT_STEERING_LIMIT,
        packets: PacketComposer | None = None,
    ) -> None:
        self.loaded = loaded
        self._packets = packets
        if steering_limit is not None and (
            not isinstance(steering_limit, (int, float)) or not math.isfinite(steering_limit) or steering_limit < 0
        ):  # NaN would compare False against every ratio: the limit silently gone
            raise InvalidInputError(f"steering_limit must be a finite number >= 0 or None, got {steering_limit!r}")
        self.steering_limit = steering_limit  # largest |delta| / |value| a request may steer by (None: any)
        self.tree = RadixTree(loaded.fingerprint, max_tokens=max_cached_tokens)
        # guards the prefix tree: held while a request composes, prefills and remembers its prompt,
        # never while it decodes (decoding uses the request's own cache), so a stream left half-read
        # or a model called from inside a callback cannot block other requests
        self.lock = threading.RLock()

    @property
    def packets(self) -> PacketComposer:
        """Where `packet`/`blend` requests get document packets: given, else the default store with the
        adapter shipped for this model (created on first use)."""
        if self._packets is None:
            self._packets = PacketComposer(self.loaded)
        return self._packets

    @_holding_lock
    def cache_prefix(self, ids: Sequence[int], boundaries: Sequence[int]) -> tuple[list[KVSegment], int]:
        """Materialise segments of `ids` cut at `boundaries` (reusing the tree); returns (segments, prefilled)."""
        if not boundaries or boundaries[-1] > len(ids):
            raise InvalidInputError("boundaries must be non-empty and within the token sequence")
        return materialize(self.loaded, self.tree, ids, boundaries)

    @_holding_lock
    def compose(self, prompt_ids: Sequence[int], strategy: str = "exact") -> ComposedCache:
        """Cache for the longest reusable prefix (`exact`), or an empty one (`text`: plain text stuffing)."""
        if strategy == "exact":
            return compose_exact(self.loaded, self.tree, prompt_ids)
        if strategy == "text":
            return ComposedCache(cache=empty_cache(self.loaded), cached_tokens=0, strategy="text", exact=True)
        raise InvalidInputError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")

    @_holding_lock
    def prefill(
        self,
        prompt_ids: Sequence[int],
        settings: GenerationSettings | None = None,
        *,
        strategy: str = "exact",
        composed: ComposedCache | None = None,
        started_at: float | None = None,
        remember_prompt: bool = False,
        steering: Sequence[SteeringVector] = (),
    ) -> Prefilled:
        """Compose a cache for `prompt_ids`, prefill what it lacks, and return the next-token logits.

        `composed` lets a caller supply a cache it built, covering `prompt_ids`' first `cached_tokens`;
        for the appended strategies (`naive`, `packet`, ...) the cache holds other positions and all of
        `prompt_ids` is prefilled on top of it. `started_at` (a `time.perf_counter()` value) moves the
        TTFT origin earlier, to include work done before the call, such as loading a pack.
        `remember_prompt` keeps the prompt's cache in the tree for the next call (agent loops). Decoders
        (free text, guided JSON) start here.
        `steering` vectors add their value deltas to every prompt position but the last, which then runs
        on the steered cache (so the first new token already reads it); the tree keeps the unsteered cache.
        """
        settings = settings or GenerationSettings()
        t0 = started_at if started_at is not None else time.perf_counter()
        ids = token_id_list(prompt_ids, self.loaded.fingerprint.vocab_size)
        appended = composed is not None and composed.strategy in APPENDED_STRATEGIES
        total = (composed.cached_tokens if composed is not None and appended else 0) + len(ids)
        check_context_window(self.loaded, total, settings.max_new_tokens)
        if composed is None:
            composed = self.compose(ids, strategy)
        elif composed.cache.get_seq_length() != composed.cached_tokens:
            raise InvalidInputError(
                f"the composed cache holds {composed.cache.get_seq_length()} positions but claims "
                f"{composed.cached_tokens}: a ComposedCache is used up by one generation; compose again"
            )
        elif (
            not appended
            and composed.token_ids is not None
            and tuple(ids[: composed.cached_tokens]) != composed.token_ids[: composed.cached_tokens]
        ):  # (a caller may crop the cache to fewer positions: the tokens it keeps must be this prompt's)
            raise InvalidInputError(
                "the composed cache was made for another prompt (its tokens are not this prompt's first "
                f"{composed.cached_tokens}): compose it for this prompt"
            )
        cached = 0 if appended else composed.cached_tokens
        if cached >= len(ids):
            raise InvalidInputError("the composed cache covers the whole prompt: leave at least one token to prefill")
        deltas = combined(steering, self.loaded.fingerprint)
        cache = composed.cache
        body = len(ids) if deltas is None else len(ids) - 1  # what is prefilled before steering
        logits = forward(self.loaded, cache, ids[cached:body]) if body > cached else None
        notes = list(composed.notes)
        if remember_prompt and composed.strategy == "exact" and body > cached:
            try:
                # only a cache known to be this prompt's own prefix may extend the tree under its tokens
                if composed.token_ids is None and cached:
                    raise CompositionError("the composed cache does not say which tokens it covers")
                check_sliding_window(self.loaded, body)
                check_rope_regime(self.loaded, len(ids), "the prompt")
            except CompositionError as exc:  # the answer still comes; only the caching is skipped
                notes.append(f"prompt not remembered: {exc}")
            else:
                for seg in segments_from_cache(self.loaded, cache, ids, [body], start=cached):
                    self.tree.insert(ids[:cached], seg)
        steered = deltas is not None and bool(torch.any(deltas))
        if deltas is not None:
            positions = cache.get_seq_length()
            ratio = steer_values(cache, deltas, positions, self.steering_limit)
            logits = forward(self.loaded, cache, ids[body:])
            if steered:
                names = ", ".join(f"{v.name} (alpha {v.alpha:g}, layers {_span(v.layers)})" for v in steering)
                notes.append(
                    f"approximate: values of {positions} cached positions steered by {names}; keys unchanged; "
                    f"largest delta {ratio:.2f} x the typical value"
                )
        assert logits is not None
        usage = Usage(
            input_tokens=total - composed.soft_tokens,
            cached_tokens=composed.cached_tokens - composed.soft_tokens,
            prefilled_tokens=len(ids) - cached,
            strategy=composed.strategy,
            exact=composed.exact and not steered,
            notes=notes,
            steering=[f"{v.name}:{v.alpha:g}" for v in steering] if steered else [],
            soft_tokens=composed.soft_tokens,
        )
        return Prefilled(cache=cache, logits=logits, usage=usage, started_at=t0)

    def stream(
        self,
        prompt_ids: Sequence[int],
        settings: GenerationSettings | None = None,
        **kwargs: Any,
    ) -> Iterator[StreamChunk]:
        """Yield text deltas; the final chunk carries the usage report. Takes `prefill`'s keywords."""
        settings = settings or GenerationSettings()
        yield from self.decode(self.prefill(prompt_ids, settings, **kwargs), settings)

    def decode(self, state: Prefilled, settings: GenerationSettings) -> Iterator[StreamChunk]:
        """Free decoding from a prefilled prompt. It touches only `state`'s private cache, never the tree,
        so it may run outside `lock` (and beside other requests' decoding)."""
        logits, cache, usage, t0 = state.logits, state.cache, state.usage, state.started_at
        generator = make_generator(settings, self.loaded.device)
        eos = self.loaded.eos_token_ids
        text = TextStream(self.loaded.tokenizer, settings.stop)
        finish = "length"
        for step in range(settings.max_new_tokens):
            token = next_token(logits, settings, generator)
            if step == 0:
                usage.ttft_ms = (time.perf_counter() - t0) * 1000
            if token in eos:
                finish = "stop"
                break
            usage.output_tokens += 1
            yield StreamChunk(text=text.push(token), token_id=token)
            if text.stopped:
                finish = "stop"
                break
            if step + 1 < settings.max_new_tokens:
                logits = forward(self.loaded, cache, [token])
        tail = text.finish()
        usage.total_ms = (time.perf_counter() - t0) * 1000
        yield StreamChunk(text=tail, usage=usage, finish_reason=finish)

    def generate(
        self,
        prompt_ids: Sequence[int],
        settings: GenerationSettings | None = None,
        **kwargs,
    ) -> GenerationResult:
        """Run `stream` to the end and collect text, output ids and usage."""
        parts, ids, usage, finish = [], [], None, "length"
        for chunk in self.stream(prompt_ids, settings, **kwargs):
            parts.append(chunk.text)
            if chunk.token_id is not None:
                ids.append(chunk.token_id)
            if chunk.usage is not None:
                usage, finish = chunk.usage, chunk.finish_reason or finish
        assert usage is not None
        return GenerationResult(text="".join(parts), token_ids=ids, usage=usage, finish_reason=finish)


def _span(layers: Sequence[int]) -> str:
    """Layers as `a-b` when contiguous, else a list."""
    ordered = sorted(layers)
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ",".join(map(str, ordered))


def token_id_list(prompt_ids: Sequence[int] | torch.Tensor, vocabulary: int) -> list[int]:
    """The prompt as plain ints (a tensor of ids, NumPy ints), each an id of the vocabulary: an embedding
    lookup out of range fails raw on a CPU and breaks a CUDA context for good. Checked in one pass over
    long prompts (this runs under the engine's lock)."""
    ids = prompt_ids.reshape(-1).tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
    if not ids:
        raise InvalidInputError("the prompt is empty")
    if not all(type(t) is int for t in ids):
        odd = next((t for t in ids if isinstance(t, bool) or not isinstance(t, Integral)), None)
        if odd is not None:
            raise InvalidInputError(f"token ids must be integers, got {type(odd).__name__} {odd!r}")
        ids = [int(t) for t in ids]  # NumPy and other integral types
    if min(ids) < 0 or max(ids) >= vocabulary:
        wrong = [t for t in ids if not 0 <= t < vocabulary]
        raise InvalidInputError(f"token ids {wrong[:5]} are not ids of this model's vocabulary (0..{vocabulary - 1})")
    return ids
