"""Value-space steering on tiny models: what changes (values, chosen layers), what never does (keys,
stored caches), algebra, files, and refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kvpack_integrations.engine import Engine
from kvpack_integrations.engine.settings import GenerationSettings
from kvpack_integrations.errors import FingerprintMismatchError, InvalidInputError
from kvpack_integrations.prompts.rendering import render_messages
from kvpack_integrations.steering import SteeringVector, build_steering_vector, resolve_layers
from kvpack_integrations.steering.apply import steer_values

from .support.tiny_models import make_model

PAIRS = [
    ("Certainly, dear colleague, I would be delighted to assist.", "yeah sure whatever"),
    ("Kindly allow me to explain this matter in detail.", "ok so basically"),
    ("It is my pleasure to provide the requested information.", "here u go"),
]
OTHER = [("The drone flies north.", "The drone flies south."), ("Fact one is true.", "Fact one is false.")]


@pytest.fixture(scope="module")
def loaded():
    return make_model("llama")


@pytest.fixture(scope="module")
def vector(loaded) -> SteeringVector:
    return build_steering_vector(loaded, PAIRS, layers="mid", name="formal", progress=False)


def _prompt(loaded) -> list[int]:
    messages = [
        {"role": "system", "content": "Norhaven Labs is a drone maker headquartered in the town of Kelmark."},
        {"role": "user", "content": "Which company produces the battery?"},
    ]
    return list(render_messages(loaded.tokenizer, messages).token_ids)


def test_layer_ranges() -> None:
    assert resolve_layers("early", 30) == tuple(range(0, 10))
    assert resolve_layers("mid", 30) == tuple(range(10, 20))
    assert resolve_layers("late", 30) == tuple(range(20, 30))
    assert resolve_layers("all", 4) == (0, 1, 2, 3)
    assert resolve_layers("0.5-1.0", 4) == (2, 3) == resolve_layers((0.5, 1.0), 4)
    assert resolve_layers([3, 1, 1], 4) == (1, 3)
    assert resolve_layers("mid", 2) == (1,)  # never empty, even on a very shallow model
    assert resolve_layers((0.95, 1.0), 4) == (3,)  # a narrow range at the top is the last layer, not none
    assert resolve_layers("0.9-1.0", 2) == (1,)
    for bad, match in [("middle", "unknown layer range"), ((0.8, 0.2), "fraction range"), ([9], "outside")]:
        with pytest.raises(InvalidInputError, match=match):
            resolve_layers(bad, 4)


def test_steering_changes_values_of_the_chosen_layers_only(loaded, vector) -> None:
    engine = Engine(loaded)
    ids = _prompt(loaded)
    plain = engine.prefill(ids, remember_prompt=True)
    steered = Engine(loaded).prefill(ids, steering=[vector.with_alpha(2.0)])
    n = len(ids) - 1  # every prompt position but the last is steered
    for layer, (a, b) in enumerate(zip(plain.cache.layers, steered.cache.layers)):
        assert torch.equal(a.keys[:, :, :n], b.keys[:, :, :n])  # keys are never touched
        diff = b.values[:, :, :n] - a.values[:, :, :n]
        if layer in vector.layers:
            want = (2.0 * vector.deltas[layer])[None, :, None, :].expand_as(diff)
            assert torch.allclose(diff, want, atol=1e-5)
        else:
            assert torch.allclose(diff, torch.zeros_like(diff), atol=1e-5)
    assert not torch.allclose(plain.logits, steered.logits)
    assert steered.usage.exact is False and steered.usage.steering == ["formal:2"]
    assert any("approximate" in n and "keys unchanged" in n for n in steered.usage.notes)


def test_stored_caches_are_never_steered(loaded, vector) -> None:
    engine = Engine(loaded)
    ids = _prompt(loaded)
    stored, _ = engine.cache_prefix(ids, [len(ids) - 6])  # a stored prefix the steered request composes from
    before = [(s.keys[layer].clone(), s.values[layer].clone()) for s in stored for layer in vector.layers]
    settings = GenerationSettings(max_new_tokens=4)
    out = engine.generate(ids, settings, steering=[vector.with_alpha(3.0)], remember_prompt=True)
    assert out.usage.cached_tokens == len(ids) - 6 and out.usage.steering == ["formal:3"]
    after = [(s.keys[layer], s.values[layer]) for s in stored for layer in vector.layers]
    assert all(torch.equal(k0, k1) and torch.equal(v0, v1) for (k0, v0), (k1, v1) in zip(before, after))
    # what the request remembered is the unsteered cache: an unsteered request reusing it answers as cold
    again = engine.generate(ids, settings)
    cold = Engine(loaded).generate(ids, settings)
    assert again.token_ids == cold.token_ids and again.usage.cached_tokens == len(ids) - 1


def test_alpha_zero_is_identical_to_unsteered(loaded, vector) -> None:
    settings = GenerationSettings(max_new_tokens=12)
    ids = _prompt(loaded)
    plain = Engine(loaded).generate(ids, settings)
    zero = Engine(loaded).generate(ids, settings, steering=[vector.with_alpha(0.0)])
    strong = Engine(loaded, steering_limit=None).generate(
        ids, settings, steering=[vector.with_alpha(8.0).with_layers("all")]
    )
    assert zero.token_ids == plain.token_ids and zero.usage.exact is True and zero.usage.steering == []
    assert strong.token_ids != plain.token_ids


def test_composition_is_the_sum_and_cosine_is_per_layer(loaded, vector) -> None:
    other = build_steering_vector(loaded, OTHER, layers="late", alpha=0.5, name="south", progress=False)
    both = vector + other
    assert torch.allclose(both.effective(), vector.effective() + other.effective())
    assert both.layers == tuple(sorted(set(vector.layers) | set(other.layers))) and both.name == "formal+south"
    assert torch.allclose((3 * vector).effective(), 3 * vector.effective())
    cos = vector.cosine(other)
    assert cos.shape == (loaded.fingerprint.num_layers,) and torch.all(cos.abs() <= 1.0 + 1e-6)
    assert torch.allclose(vector.cosine(vector), torch.ones_like(cos), atol=1e-5)
    # two vectors at once act as their sum
    ids = _prompt(loaded)
    two = Engine(loaded).prefill(ids, steering=[vector, other])
    one = Engine(loaded).prefill(ids, steering=[both])
    assert torch.allclose(two.logits, one.logits, atol=1e-4)


def test_files_fingerprints_and_bad_values(loaded, vector, tmp_path: Path) -> None:
    path = vector.with_alpha(0.7).save(tmp_path / "formal.safetensors")
    back = SteeringVector.load(path, loaded.fingerprint)
    assert torch.equal(back.deltas, vector.deltas) and back.alpha == 0.7 and back.layers == vector.layers
    stranger = make_model("qwen2")
    with pytest.raises(FingerprintMismatchError, match="built for another model"):
        SteeringVector.load(path, stranger.fingerprint)
    with pytest.raises(FingerprintMismatchError):
        Engine(stranger).prefill(_prompt(stranger), steering=[vector])
    bad = vector.deltas.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        SteeringVector(bad, vector.layers, 1.0, vector.fingerprint)
    with pytest.raises(InvalidInputError, match="alpha must be a finite number"):
        vector.with_alpha(float("inf"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(InvalidInputError, match="not a readable steering vector"):
        SteeringVector.load(tmp_path / "junk.safetensors")


def test_damaged_vector_files_are_named(loaded, vector, tmp_path: Path) -> None:
    """Metadata a damaged or hand-edited file holds is refused naming the file, not with a raw JSON, type
    or value error; a layer must be a whole index (1.5 used to be accepted)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = vector.save(tmp_path / "formal.safetensors")
    with safe_open(str(path), "pt") as fh:
        meta, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    for key, value, problem in [
        ("layers", "[1.5]", "whole layer indices"),
        ("layers", '["1"]', "whole layer indices"),
        ("layers", "[true]", "whole layer indices"),
        ("layers", "1,2", "Extra data"),
        ("layers", "{}", "is not a list"),
        ("layers", "7", "is not a list"),
        ("alpha", "strong", "could not convert"),
        ("alpha", "nan", "alpha must be a finite number"),
    ]:
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={**meta, key: value})
        with pytest.raises(InvalidInputError, match="damaged steering vector file") as info:
            SteeringVector.load(bad, loaded.fingerprint)
        assert str(bad) in str(info.value) and problem in str(info.value), (key, value)
    for layers in [(1.5,), (1.0,), (True,)]:
        with pytest.raises(InvalidInputError, match="whole layer indices"):
            SteeringVector(vector.deltas, layers, 1.0, vector.fingerprint)  # type: ignore[arg-type]


def test_bad_layers_or_alpha_fail_before_any_pair_runs(loaded, monkeypatch, tmp_path: Path) -> None:
    """Layers past the model's depth and a non-finite alpha are refused before the pairs run, not after."""
    import kvpack_integrations.steering.build as build

    def no_pairs(*args, **kwargs):
        raise AssertionError("a pair ran for a vector that could not be built")

    monkeypatch.setattr(build, "mean_values", no_pairs)
    for layers, alpha, problem in [([0, 99], 1.0, "outside this model's"), ("mid", float("nan"), "finite")]:
        with pytest.raises(InvalidInputError, match=problem):
            build_steering_vector(loaded, PAIRS, layers=layers, alpha=alpha, progress=False)
    with pytest.raises(InvalidInputError, match="negative"):
        resolve_layers([-1, 2], 4)


def test_pairs_files_that_are_not_utf8_are_named(tmp_path: Path) -> None:
    from kvpack_integrations.steering import load_pairs

    latin = tmp_path / "pairs.jsonl"
    latin.write_bytes('{"positive": "caf\u00e9", "negative": "x"}\n'.encode("latin-1"))
    with pytest.raises(InvalidInputError, match=re.escape(f"{latin} is not UTF-8 text")):
        load_pairs(latin)
    with pytest.raises(InvalidInputError, match="pairs file not found"):
        load_pairs(tmp_path / "missing.jsonl")


def test_steer_values_refuses_a_cache_of_another_depth(loaded, vector) -> None:
    cache = Engine(loaded).prefill(_prompt(loaded)).cache
    with pytest.raises(Exception, match="layers"):
        steer_values(cache, vector.deltas[:1], 3)


def test_a_delta_larger_than_the_values_is_refused(loaded, vector) -> None:
    ids = _prompt(loaded)
    engine = Engine(loaded)
    plain = engine.prefill(ids)
    ratio = float(plain.cache.layers[vector.layers[0]].values.norm(dim=-1).pow(2).mean().sqrt())
    too_much = vector.with_alpha(1e4 / max(float(vector.deltas.norm()), 1e-6) * ratio)
    with pytest.raises(InvalidInputError, match=r"steering too strong: at layer \d+ the delta is [\d.]+ times"):
        engine.prefill(ids, steering=[too_much])
    ok = Engine(loaded, steering_limit=None).prefill(ids, steering=[too_much])  # experiments may lift the limit
    assert torch.isfinite(ok.logits).all() and "largest delta" in ok.usage.notes[-1]
    # a refused request that composes from a stored prefix and remembers its prompt changes nothing stored:
    # the prefix's tensors are as they were, and the tree (now holding the prompt, remembered before the
    # refusal) still serves the plain prompt
    stored, _ = engine.cache_prefix(ids, [len(ids) - 6])
    before = [(k.clone(), v.clone()) for s in stored for k, v in zip(s.keys, s.values)]
    with pytest.raises(InvalidInputError, match="steering too strong"):
        engine.prefill(ids, steering=[too_much], remember_prompt=True)
    after = [(k, v) for s in stored for k, v in zip(s.keys, s.values)]
    assert len(after) == len(before) > 0
    assert all(torch.equal(k0, k1) and torch.equal(v0, v1) for (k0, v0), (k1, v1) in zip(before, after))
    again = engine.prefill(ids)
    assert again.usage.cached_tokens == len(ids) - 1  # served from the tree, not computed afresh
    assert torch.allclose(again.logits, plain.logits, atol=1e-5)


def test_the_steering_limit_must_be_a_number(loaded) -> None:
    """NaN compares False against every ratio: such a limit would silently let any delta through."""
    for bad in (float("nan"), float("inf"), -1.0, "1"):
        with pytest.raises(InvalidInputError, match="steering_limit must be a finite number >= 0 or None"):
            Engine(loaded, steering_limit=bad)
    assert Engine(loaded, steering_limit=None).steering_limit is None and Engine(loaded).steering_limit == 1.0


@pytest.mark.parametrize("family", ["mistral", "gemma"])
def test_vectors_for_templates_that_want_a_user_turn_first(family: str) -> None:
    """Mistral's and Gemma's templates refuse a conversation that opens with the assistant: the texts go
    after a fixed user turn, and the vector still averages the texts' own values (layer 0 holds each
    token's values alone, so it equals the mean over the text's tokens in a plain forward)."""
    from kvpack_integrations.composition.cache_ops import empty_cache, forward

    model = make_model(family)
    vector = build_steering_vector(model, PAIRS[:1], layers="all", progress=False)
    pos, neg = PAIRS[0]

    def layer0_mean(text: str) -> torch.Tensor:
        rendered = render_messages(
            model.tokenizer,
            [{"role": "user", "content": "Reply."}, {"role": "assistant", "content": text}],
            add_generation_prompt=False,
        )
        lo, hi = rendered.part(1).tokens
        cache = empty_cache(model)
        forward(model, cache, list(rendered.token_ids))
        return cache.layers[0].values[0, :, lo:hi].float().mean(dim=1)

    torch.testing.assert_close(vector.deltas[0], layer0_mean(pos) - layer0_mean(neg))


def test_sliding_window_models_refuse_texts_past_the_window() -> None:
    model = make_model("phi3", sliding_window=8)
    with pytest.raises(InvalidInputError, match="each keeps its last 7 positions"):
        build_steering_vector(model, PAIRS[:1], progress=False)


def test_two_vectors_differing_past_the_tensor_summary_have_different_reprs(vector) -> None:
    """LangChain's cache keys a call's `steering=` by repr: the dataclass repr summarised the deltas, so a
    vector changed in one middle element had the same repr, and a cached answer of the other."""
    import dataclasses

    deltas = vector.deltas.clone()
    middle = tuple(n // 2 for n in deltas.shape)
    deltas[middle] += 1.0
    changed = dataclasses.replace(vector, deltas=deltas)
    assert repr(changed) != repr(vector) and vector.digest in repr(vector)
