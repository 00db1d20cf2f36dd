"""The paired bootstrap interval `kvpack eval packet` puts around F1(method) / F1(full)."""

from __future__ import annotations

import random

import pytest

from kvpack_integrations.errors import InvalidInputError
from kvpack_integrations.evaluation.bootstrap import ratio_interval


def test_a_fixed_ratio_has_no_spread() -> None:
    full = [0.0, 0.2, 0.5, 1.0, 0.1]
    assert ratio_interval(full, full) == (1.0, 1.0)
    assert ratio_interval([f / 2 for f in full], full) == pytest.approx((0.5, 0.5))


def test_the_interval_holds_the_ratio_and_narrows_with_more_rows() -> None:
    rng = random.Random(1)
    full = [rng.random() for _ in range(400)]
    method = [f * 0.8 + rng.uniform(-0.2, 0.2) for f in full]
    point = sum(method) / sum(full)
    small, large = ratio_interval(method[:40], full[:40]), ratio_interval(method, full)
    assert small is not None and large is not None
    assert large[0] < point < large[1] and small[0] < small[1]
    assert large[1] - large[0] < small[1] - small[0]
    assert ratio_interval(method, full) == large  # seeded: the same rows give the same interval
    wider = ratio_interval(method, full, level=0.99)
    assert wider is not None and wider[0] <= large[0] and wider[1] >= large[1]


def test_an_undefined_ratio_and_bad_input() -> None:
    assert ratio_interval([0.1, 0.2], [0.0, 0.0]) is None  # full scores nothing: no ratio to bound
    with pytest.raises(InvalidInputError, match="equally long"):
        ratio_interval([0.1], [0.1, 0.2])
    with pytest.raises(InvalidInputError, match="non-empty"):
        ratio_interval([], [])
    with pytest.raises(InvalidInputError, match="level"):
        ratio_interval([0.1], [0.1], level=1.5)
