"""Key re-rotation: a document's layer-0 keys cached at position 0 and moved to p equal the keys the model
computes at p, on every family with RoPE and for every supported RoPE variant; the rest are refused."""

from __future__ import annotations

import pytest
import torch

from kvpack_integrations.composition.cache_ops import empty_cache, forward
from kvpack_integrations.composition.rope import rerotate, rope_spec
from kvpack_integrations.errors import CompositionError

from .support.tiny_models import FAMILIES, make_model

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
