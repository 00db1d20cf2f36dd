"""Key re-rotation: a document's layer-0 keys cached at position 0 and moved to p equal the keys the model
computes at p, on every family with RoPE and for every supported RoPE variant; the rest are refused."""

from __future__ import annotations

import pytest
import torch

from kvpack_integrations.composition.cache_ops import empty_cache, forward
from kvpack_integrations.composition.rope import rerotate, rope_spec
from kvpack_integrations.errors import CompositionError

from .support.tiny_models import FAMILIES, INTERLEAVED_ROPE, make_interleaved_rope_model, make_model

DOC = "The Tessel-9 battery is made by Quill Energy in Ondria."
PREFIX = "Answer the user's question using the knowledge below. Fact one. Fact two. Fact three."


def _layer0_keys(loaded, ids: list[int]) -> torch.Tensor:
    cache = empty_cache(loaded)
    forward(loaded, cache, ids)
    return cache.layers[0].keys[0]  # [kv_heads, seq, head_dim]


def _check_moves(loaded) -> None:
    tok = loaded.tokenizer
    doc = tok(DOC, add_special_tokens=False)["input_ids"]
    prefix = tok(PREFIX, add_special_tokens=False)["input_ids"]
    at_zero = _layer0_keys(loaded, doc)
    at_p = _layer0_keys(loaded, prefix + doc)[:, len(prefix) :]
    moved = rerotate(at_zero, len(prefix), rope_spec(loaded))
    assert not torch.allclose(at_zero, at_p, atol=1e-3)  # the positions really differ
    torch.testing.assert_close(moved, at_p, atol=2e-5, rtol=1e-4)
    # and back again, per position shifts included
    back = rerotate(moved, torch.full((len(doc),), -len(prefix)), rope_spec(loaded))
    torch.testing.assert_close(back, at_zero, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rerotated_keys_equal_keys_computed_at_the_new_position(family: str) -> None:
    _check_moves(make_model(family))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_halves_families_are_read_as_such(family: str) -> None:
    assert not rope_spec(make_model(family)).interleaved


@pytest.mark.parametrize("name", sorted(INTERLEAVED_ROPE))
def test_interleaved_rope_families_are_rerotated_pairwise(name: str) -> None:
    """Cohere, GLM, Ernie 4.5, Helium pair dims (2i, 2i+1) under the same RoPE type as Llama: moved in the
    two-halves layout their keys came out wrong (max error ~7.9) with no error at all."""
    loaded = make_interleaved_rope_model(name)
    _check_moves(loaded)
    assert rope_spec(loaded).interleaved


def test_interleaved_partial_rotary_leaves_the_rest() -> None:
    loaded = make_interleaved_rope_model("glm", partial_rotary_factor=0.25)
    _check_moves(loaded)
    spec = rope_spec(loaded)
    assert spec.interleaved and spec.rot_dim == loaded.fingerprint.head_dim // 4


def test_unknown_rotary_layout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose modeling code has no `rotate_half` (or one of a third layout) cannot be re-rotated
    safely: refused by name, not guessed."""
    import sys

    loaded = make_model("llama")
    module = sys.modules[type(loaded.model).__module__]
    monkeypatch.setattr(module, "rotate_half", lambda x: torch.flip(x, dims=(-1,)))
    with pytest.raises(CompositionError, match=r"tiny-llama-0: its rotate_half maps \[0, 1, 2, 3\] to \[3.0"):
        rope_spec(loaded)
    monkeypatch.delattr(module, "rotate_half")
    with pytest.raises(CompositionError, match=r"tiny-llama-0: its modeling code .* has no rotate_half"):
        rope_spec(loaded)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
    ],
    ids=lambda s: s["rope_type"],
)
def test_scaled_rope_variants(scaling: dict) -> None:
    loaded = make_model("llama", rope_parameters={"rope_theta": 10000.0, **scaling})
    assert rope_spec(loaded).rope_type == scaling["rope_type"]
    _check_moves(loaded)


def test_partial_rotary_rotates_only_the_rotary_dims() -> None:
    loaded = make_model("phi3", partial_rotary_factor=0.5)
    spec = rope_spec(loaded)
    assert spec.rot_dim == loaded.fingerprint.head_dim // 2
    _check_moves(loaded)


def test_length_dependent_rope_is_refused() -> None:
    loaded = make_model("llama", rope_parameters={"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(CompositionError, match=r"RoPE type 'dynamic'.*depend on the sequence length"):
        rope_spec(loaded)
    with pytest.raises(CompositionError, match="position shifts"):
        rerotate(torch.zeros(2, 5, 16), torch.zeros(3), rope_spec(make_model("llama")))


@pytest.mark.parametrize("uses_rope", [[1, 0], [0, 1]], ids=["rope-first", "nope-first"])
def test_layers_without_rope_keep_their_keys(uses_rope: list[int]) -> None:
    """SmolLM3-style `no_rope_layers`: every layer's keys are moved as one tensor, and a layer that applies
    no RoPE must come out unrotated (its keys at p equal its keys at 0); layer 0 is checked both ways."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    from kvpack_integrations.composition.rope import rerotate_layers

    from .support.tiny_models import make_tokenizer, tiny_model

    tok = make_tokenizer("qwen2")
    loaded = tiny_model(SmolLM3Config, SmolLM3ForCausalLM, tok, "tiny-smollm3", no_rope_layers=uses_rope)
    spec = rope_spec(loaded)
    assert spec.unrotated_layers == frozenset(i for i, r in enumerate(uses_rope) if not r)
    doc = tok(DOC, add_special_tokens=False)["input_ids"]
    prefix = tok(PREFIX, add_special_tokens=False)["input_ids"]
    cache = empty_cache(loaded)
    forward(loaded, cache, doc)
    at_zero = torch.stack([layer.keys[0] for layer in cache.layers])
    moved = rerotate_layers(at_zero, len(prefix), spec)
    torch.testing.assert_close(moved[0], _layer0_keys(loaded, prefix + doc)[:, len(prefix) :], atol=2e-5, rtol=1e-4)
    assert torch.equal(moved[1], at_zero[1]) != bool(uses_rope[1])  # layer 1: rotated exactly when it uses RoPE
    with pytest.raises(CompositionError, match="no_rope_layers has 1 entries for 2 layers"):
        loaded.model.config.no_rope_layers = [1]
        rope_spec(loaded)


def test_gemma3_rotary_embeddings_per_layer_type_are_refused_as_such() -> None:
    """transformers 5 gives Gemma 3 one rotary module with a frequency table per layer type (local and
    global): refused for what it is, not as a model without RoPE."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from .support.tiny_models import make_tokenizer, tiny_model

    layers = ["sliding_attention", "full_attention"]
    loaded = tiny_model(
        Gemma3TextConfig, Gemma3ForCausalLM, make_tokenizer("gemma"), "g3", head_dim=16, layer_types=layers
    )
    with pytest.raises(CompositionError, match=r"several rotary embeddings .*full_attention_inv_freq"):
        rope_spec(loaded)


def _rotate_as_before(keys: torch.Tensor, delta, spec) -> torch.Tensor:
    """The re-rotation as first written (angles on the host, x cos + rotate_half(x) sin, then cat): the
    stored benchmarks' keys, which the device-side rewrite must give bit for bit."""
    shift = torch.as_tensor(delta, dtype=torch.float64).reshape(-1)
    angles = shift[:, None] * spec.inv_freq.double()[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()
    rotated, rest = keys[..., : spec.rot_dim].float(), keys[..., spec.rot_dim :]
    half = rotated.shape[-1] // 2
    out = rotated * cos + torch.cat((-rotated[..., half:], rotated[..., :half]), dim=-1) * sin
    return torch.cat((out.to(keys.dtype), rest), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rerotation_is_bit_for_bit_the_first_version(dtype) -> None:
    from dataclasses import replace

    from kvpack_integrations.composition.rope import RopeSpec

    g = torch.Generator().manual_seed(0)
    for rot in (64, 32):  # full and partial rotary
        spec = RopeSpec(1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot)), rot, "default")
        keys = torch.randn(3, 2, 40, 64, generator=g).to(dtype)
        for delta in (5, 70_001, 2**25 + 3, torch.arange(40) * 7):
            assert torch.equal(rerotate(keys, delta, spec), _rotate_as_before(keys, delta, spec)), (rot, delta)
        with pytest.raises(CompositionError, match="must not share the keys' memory"):
            rerotate(keys, 5, spec, out=keys)
        scaled = replace(spec, inv_freq=spec.inv_freq / 8)  # a copy computes its own device frequencies
        assert torch.equal(rerotate(keys, 5, scaled), _rotate_as_before(keys, 5, scaled))
