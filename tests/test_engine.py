"""Layer 7: decoding, streaming, stop sequences, sampling, usage, and the immutability of stored caches."""

from __future__ import annotations

import pytest
import torch

from kvpack_integrations import Engine, GenerationSettings, build_pack, knowledge_prompt, load_pack
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.errors import ContextTooLongError, InvalidInputError
from kvpack_integrations.prompts import KnowledgeFormat

from .conftest import FACTS, QUESTION
from .support.tiny_models import make_model


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


@pytest.fixture(scope="module")
def ids(llama):
    return knowledge_prompt(llama.tokenizer, FACTS, QUESTION, KnowledgeFormat()).token_ids


def test_stream_concatenates_to_generate(llama, ids) -> None:
    settings = GenerationSettings(max_new_tokens=20)
    result = Engine(llama).generate(ids, settings)
    chunks = list(Engine(llama).stream(ids, settings))
    assert "".join(c.text for c in chunks) == result.text
    assert [c.token_id for c in chunks if c.token_id is not None] == result.token_ids
    assert chunks[-1].usage is not None and chunks[-1].finish_reason == result.finish_reason
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_and_usage(llama, ids) -> None:
    result = Engine(llama).generate(ids, GenerationSettings(max_new_tokens=7))
    u = result.usage
    assert result.finish_reason == "length" and u.output_tokens == 7 == len(result.token_ids)
    assert u.input_tokens == len(ids) == u.cached_tokens + u.prefilled_tokens
    assert 0 < u.ttft_ms <= u.total_ms


def test_stop_sequence_truncates_and_stops(llama, ids) -> None:
    full = Engine(llama).generate(ids, GenerationSettings(max_new_tokens=30)).text
    assert len(full) > 8
    stop = full[5:8]
    cut = full.find(stop)
    result = Engine(llama).generate(ids, GenerationSettings(max_new_tokens=30, stop=(stop,)))
    assert result.text == full[:cut]
    assert result.finish_reason == "stop"
    streamed = "".join(c.text for c in Engine(llama).stream(ids, GenerationSettings(max_new_tokens=30, stop=(stop,))))
    assert streamed == full[:cut]


def test_sampling_is_reproducible_with_a_seed(llama, ids) -> None:
    def sample(seed: int) -> list[int]:
        s = GenerationSettings(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=50, seed=seed)
        return Engine(llama).generate(ids, s).token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2) or sample(1) != sample(3)


def test_stored_caches_are_never_mutated(llama, store) -> None:
    build_pack(llama, RadixTree(llama.fingerprint), store, "kb", FACTS)
    engine = Engine(llama)
    load_pack(llama, engine.tree, store, "kb")
    before = [
        (s.segment.keys[0].clone(), s.segment.values[-1].clone(), s.segment)
        for s in engine.tree.match(
            knowledge_prompt(llama.tokenizer, FACTS, QUESTION, KnowledgeFormat()).token_ids
        ).pieces
    ]
    ids = knowledge_prompt(llama.tokenizer, FACTS, QUESTION, KnowledgeFormat()).token_ids
    first = engine.generate(ids, GenerationSettings(max_new_tokens=16))
    second = engine.generate(ids, GenerationSettings(max_new_tokens=16))
    assert first.token_ids == second.token_ids
    for k, v, seg in before:
        assert torch.equal(seg.keys[0], k) and torch.equal(seg.values[-1], v)
        assert seg.keys[0].shape[1] == len(seg)


def test_remember_prompt_makes_the_next_step_prefill_only_new_tokens(llama, ids) -> None:
    engine = Engine(llama)
    first = engine.generate(ids, GenerationSettings(max_new_tokens=8), remember_prompt=True)
    followup = knowledge_prompt(
        llama.tokenizer, FACTS, "And who makes the drone?", KnowledgeFormat(), history=[(QUESTION, first.text)]
    ).token_ids
    second = engine.generate(followup, GenerationSettings(max_new_tokens=8))
    shared = next((i for i, (a, b) in enumerate(zip(ids, followup)) if a != b), min(len(ids), len(followup)))
    assert shared > len(ids) - 3  # the follow-up continues the first prompt
    assert second.usage.cached_tokens >= shared
    assert second.usage.prefilled_tokens == len(followup) - second.usage.cached_tokens
    assert (
        second.token_ids
        == Engine(llama).generate(followup, GenerationSettings(max_new_tokens=8), strategy="text").token_ids
    )


def test_context_too_long_and_bad_settings(ids) -> None:
    small = make_model("llama", max_positions=64)
    with pytest.raises(ContextTooLongError, match="context window of 64"):
        Engine(small).generate(ids, GenerationSettings(max_new_tokens=4))
    with pytest.raises(ContextTooLongError):
        Engine(small).cache_prefix(ids, [len(ids)])
    with pytest.raises(InvalidInputError, match="empty"):
        Engine(small).generate([], GenerationSettings())
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(InvalidInputError, match="top_p"):
        GenerationSettings(top_p=0)
    with pytest.raises(InvalidInputError, match="stop"):
        GenerationSettings(stop=("",))
    with pytest.raises(InvalidInputError, match="strategy"):
        Engine(small).compose([1, 2], strategy="magic")


def test_a_composed_cache_of_another_prompt_is_refused_not_remembered(llama) -> None:
    """A cache composed for prompt A and cut to 3 positions, given with prompt B: its K/V were stored in
    the tree under B's tokens, and later requests for B were served A's cache, reported exact."""
    tok = llama.tokenizer
    a = tok("The Aurora X2 flies for 48 minutes. Which company makes the battery?", add_special_tokens=False)
    b = tok("Quill Energy makes the Tessel-9 battery. Who founded the lab in Kelmark?", add_special_tokens=False)
    a, b = a["input_ids"], b["input_ids"]
    engine = Engine(llama)
    engine.cache_prefix(a, [10])
    settings = GenerationSettings(max_new_tokens=6)
    for prompt, refused in ((b, True), (a, False)):
        composed = engine.compose(a)
        composed.cache.crop(3 - composed.cached_tokens)  # a caller keeps the first 3 positions
        composed.cached_tokens = 3
        if refused:
            with pytest.raises(InvalidInputError, match="made for another prompt"):
                engine.generate(prompt, settings, composed=composed, remember_prompt=True)
        else:  # its own prompt, cropped: accepted, and equal to text stuffing
            kv = engine.generate(prompt, settings, composed=composed, remember_prompt=True)
            assert kv.token_ids == Engine(llama).generate(prompt, settings, strategy="text").token_ids
    later = engine.generate(b, settings)
    assert later.token_ids == Engine(llama).generate(b, settings, strategy="text").token_ids


def test_settings_and_token_ids_that_would_fail_raw_are_refused_by_name(llama, ids) -> None:
    for bad, match in (
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
        ({"top_k": 1.5}, "top_k must be an integer"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            GenerationSettings(**bad)
    vocabulary = llama.fingerprint.vocab_size
    for wrong in (vocabulary, -1):
        with pytest.raises(InvalidInputError, match=rf"token ids \[{wrong}\] are not ids of this model's vocabulary"):
            Engine(llama).generate([*ids[:5], wrong], GenerationSettings(max_new_tokens=2))


def test_a_tensor_or_numpy_ids_are_a_prompt_too(llama, ids) -> None:
    """A tokenizer's `return_tensors="pt"` row worked before the vocabulary check; it still does."""
    import numpy as np

    settings = GenerationSettings(max_new_tokens=3)
    plain = Engine(llama).generate(ids, settings).token_ids
    assert Engine(llama).generate(torch.tensor(ids), settings).token_ids == plain
    assert Engine(llama).generate(np.array(ids), settings).token_ids == plain
    with pytest.raises(InvalidInputError, match="token ids must be integers, got float"):
        Engine(llama).generate([*ids[:3], 1.5], settings)
    with pytest.raises(InvalidInputError, match="token ids must be integers, got bool"):
        Engine(llama).generate([*ids[:3], True], settings)
