"""Exact mode is text stuffing: identical greedy ids on every family, sequential == joint, naive != joint."""

from __future__ import annotations

import pytest
import torch

from kvpack_integrations import Engine, GenerationSettings, build_pack, knowledge_prompt, load_pack
from kvpack_integrations.composition import RadixTree, compose_naive, empty_cache, forward
from kvpack_integrations.errors import CompositionError
from kvpack_integrations.prompts import KnowledgeFormat

from .conftest import FACTS, QUESTION
from .support.tiny_models import FAMILIES, make_model

FMT = KnowledgeFormat()
GREEDY = GenerationSettings(max_new_tokens=24)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exact_pack_equals_text_stuffing(family: str, store) -> None:
    loaded = make_model(family)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)
    engine = Engine(loaded)
    load_pack(loaded, engine.tree, store, "kb")
    prompt = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, FMT)
    kv = engine.generate(prompt.token_ids, GREEDY)
    text = Engine(loaded).generate(prompt.token_ids, GREEDY, strategy="text")
    assert kv.token_ids == text.token_ids
    assert len(kv.token_ids) > 0
    # the whole pack was reused and only the question part was prefilled
    assert kv.usage.cached_tokens == prompt.knowledge_cuts[-1]
    assert kv.usage.prefilled_tokens == len(prompt.token_ids) - prompt.knowledge_cuts[-1]
    assert kv.usage.strategy == "exact" and kv.usage.exact
    assert text.usage.cached_tokens == 0 and text.usage.prefilled_tokens == len(prompt.token_ids)
    # and both are what a user gets from transformers' own generate() on the text prompt
    with torch.no_grad():
        hf = loaded.model.generate(
            torch.tensor([prompt.token_ids]),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=list(loaded.eos_token_ids),
        )[0, len(prompt.token_ids) :].tolist()
    hf = [t for t in hf if t not in loaded.eos_token_ids and t != loaded.tokenizer.pad_token_id]
    assert kv.token_ids == hf[: len(kv.token_ids)]


def _layer_keys(cache, n: int) -> list[torch.Tensor]:
    return [layer.keys[0, :, :n].clone() for layer in cache.layers]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_sequential_composition_equals_joint_prefill(family: str) -> None:
    loaded = make_model(family)
    full = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, FMT)
    n = full.knowledge_cuts[-1]
    # pack A (the first fact), then pack B (the rest) prefilled with A in front
    engine = Engine(loaded)
    a = knowledge_prompt(loaded.tokenizer, FACTS[:1], QUESTION, FMT)
    _, built_a = engine.cache_prefix(a.token_ids, a.knowledge_cuts[:-1])
    _, built_b = engine.cache_prefix(full.token_ids, full.knowledge_cuts)
    assert built_a + built_b == n  # B prefilled only its own tokens
    composed = engine.compose(full.token_ids)
    assert composed.cached_tokens == n and composed.exact
    joint = empty_cache(loaded)
    forward(loaded, joint, full.token_ids[:n])
    for ks, kj in zip(_layer_keys(composed.cache, n), _layer_keys(joint, n)):
        torch.testing.assert_close(ks, kj, rtol=1e-4, atol=1e-5)
    seq = engine.generate(full.token_ids, GREEDY)
    text = Engine(loaded).generate(full.token_ids, GREEDY, strategy="text")
    assert seq.token_ids == text.token_ids


def test_naive_concatenation_differs_and_is_flagged() -> None:
    loaded = make_model("llama")
    full = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, FMT)
    engine = Engine(loaded)
    # each fact cached on its own from position 0, as its own system message
    parts = []
    for fact in FACTS:
        p = knowledge_prompt(loaded.tokenizer, [fact], QUESTION, FMT)
        segs, _ = Engine(loaded).cache_prefix(p.token_ids, [p.knowledge_cuts[-2]])
        parts.append(segs[0])
    tail = full.token_ids[full.knowledge_cuts[-2] :]
    naive = compose_naive(loaded, parts)
    assert naive.strategy == "naive" and not naive.exact
    result = engine.generate(tail, GREEDY, composed=naive)
    assert result.usage.exact is False and result.usage.strategy == "naive"
    assert any("approximate" in note for note in result.usage.notes)
    # the concatenated cache is not the joint cache of the same knowledge
    joint = empty_cache(loaded)
    forward(loaded, joint, full.token_ids[: full.knowledge_cuts[-2]])
    naive_again = compose_naive(loaded, parts)
    nk = naive_again.cache.layers[1].keys
    jk = joint.layers[1].keys
    assert nk.shape[-2] != jk.shape[-2] or (nk - jk).abs().max() > 1e-3
    # and its answer logits differ from text stuffing's
    text_logits = forward(loaded, empty_cache(loaded), full.token_ids)
    naive_logits = forward(loaded, compose_naive(loaded, parts).cache, tail)
    assert (text_logits - naive_logits).abs().max() > 1e-3


def test_sliding_window_models_refuse_prefixes_past_the_window() -> None:
    loaded = make_model("mistral", sliding_window=32)
    prompt = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, FMT)
    assert prompt.knowledge_cuts[-1] > 32
    with pytest.raises(CompositionError, match="sliding-window"):
        Engine(loaded).cache_prefix(prompt.token_ids, prompt.knowledge_cuts)


def test_sliding_window_models_are_exact_within_the_window(store) -> None:
    loaded = make_model("mistral", sliding_window=512)
    build_pack(loaded, RadixTree(loaded.fingerprint), store, "kb", FACTS)
    engine = Engine(loaded)
    load_pack(loaded, engine.tree, store, "kb")
    ids = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, FMT).token_ids
    assert engine.generate(ids, GREEDY).token_ids == Engine(loaded).generate(ids, GREEDY, strategy="text").token_ids


def test_prompt_that_changes_a_cached_token_is_recomputed_not_reused() -> None:
    loaded = make_model("qwen2")
    engine = Engine(loaded)
    p = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, FMT)
    engine.cache_prefix(p.token_ids, p.knowledge_cuts)
    edited = [*FACTS[:1], "The Aurora X2 flies for 49 minutes.", FACTS[2]]
    q = knowledge_prompt(loaded.tokenizer, edited, QUESTION, FMT)
    kv = engine.generate(q.token_ids, GREEDY)
    # reuse stops at the first differing token; everything after it is prefilled
    first_diff = next(i for i, (x, y) in enumerate(zip(p.token_ids, q.token_ids)) if x != y)
    assert kv.usage.cached_tokens == first_diff
    assert kv.token_ids == Engine(loaded).generate(q.token_ids, GREEDY, strategy="text").token_ids


def _longrope_phi3(limit: int):
    """A tiny Phi-3 with LongRoPE whose short-factor range ends at `limit` positions (Phi-3 128k's kind)."""
    half = make_model("phi3").fingerprint.head_dim // 2
    parameters = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * half,
        "long_factor": [4.0 + i for i in range(half)],
        "original_max_position_embeddings": limit,
    }
    return make_model("phi3", original_max_position_embeddings=limit, rope_parameters=parameters)


def test_longrope_prompts_past_the_short_range_reuse_nothing_and_stay_exact() -> None:
    """LongRoPE rotates a whole forward with long factors once it reaches past its short range: a cached
    prefix (computed short) reused under such a prompt gave other tokens, reported exact."""
    loaded = _longrope_phi3(32)
    assert loaded.rope_regime_limit == 32 and make_model("phi3").rope_regime_limit is None
    prompt = knowledge_prompt(loaded.tokenizer, FACTS, QUESTION, FMT)
    ids = prompt.token_ids
    assert len(ids) > 32
    engine = Engine(loaded)
    engine.cache_prefix(ids, [20])  # a short prefix, computed in the short regime
    kv = engine.generate(ids, GREEDY, remember_prompt=True)
    text = Engine(loaded).generate(ids, GREEDY, strategy="text")
    assert kv.token_ids == text.token_ids and kv.usage.exact
    assert kv.usage.cached_tokens == 0 and any("LongRoPE" in n for n in kv.usage.notes)
    assert engine.tree.match(ids).length == 20  # the long prompt was not remembered
    short = ids[:30]  # within the short range the prefix is reused, and exactly
    reused = engine.generate(short, GREEDY)
    assert reused.usage.cached_tokens == 20
    assert reused.token_ids == Engine(loaded).generate(short, GREEDY, strategy="text").token_ids
    with pytest.raises(CompositionError, match="LongRoPE"):  # a pack past the range is refused, as a window is
        Engine(loaded).cache_prefix(ids, prompt.knowledge_cuts)
