"""The KV cache reaches the model under the keyword its forward declares (`cache` or `past_key_values`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvpack_integrations.composition.cache_ops import empty_cache
from kvpack_integrations.errors import ModelLoadError
from kvpack_integrations.runtime.cache_keyword import cache_keyword, with_cache
from tests.support.tiny_models import FAMILIES, make_model


class _Renamed:
    def forward(self, input_ids: Any = None, cache: Any = None, **kwargs: Any) -> None: ...


class _Legacy:
    def forward(self, input_ids: Any = None, past_key_values: Any = None, **kwargs: Any) -> None: ...


class _NoCache:
    def forward(self, input_ids: Any = None, **kwargs: Any) -> None: ...


def test_keyword_follows_the_forward_signature() -> None:
    assert cache_keyword(_Renamed) == "cache"
    assert cache_keyword(_Legacy) == "past_key_values"
    assert with_cache(_Legacy(), "C") == {"past_key_values": "C"}


def test_a_forward_without_a_cache_is_refused_by_name() -> None:
    with pytest.raises(ModelLoadError, match=r"_NoCache\.forward takes no KV cache"):
        cache_keyword(_NoCache)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_model_fills_the_cache_it_is_handed(family: str) -> None:
    """An ignored keyword would leave the cache empty (the model would build its own)."""
    loaded = make_model(family)
    cache = empty_cache(loaded)
    with torch.no_grad():
        loaded.model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), **with_cache(loaded.model, cache), use_cache=True)
    assert cache.get_seq_length() == 5
