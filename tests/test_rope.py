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
