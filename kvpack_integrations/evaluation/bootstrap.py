"""A paired bootstrap interval for the ratio of two means measured on the same rows.

Why: `kvpack eval packet` reports F1(method) / F1(full) on 100 rows where the default model's F1 is
near 0.06, so a few overlapping words move the ratio by ten points. Resampling the rows (both methods
together, so the pairing is kept) shows how far the ratio can be trusted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..errors import InvalidInputError


def ratio_interval(
    numerator: Sequence[float],
    denominator: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile interval of sum(numerator) / sum(denominator) over rows resampled with replacement.

    `None` when the denominator sums to zero in some resample (the ratio is then undefined there).
    """
    if len(numerator) != len(denominator) or not numerator:
        raise InvalidInputError(
            f"a paired interval needs two equally long, non-empty series, got {len(numerator)} and {len(denominator)}"
        )
    if not 0 < level < 1 or resamples < 1:
        raise InvalidInputError(f"level must lie in (0, 1) and resamples be >= 1, got {level} and {resamples}")
    rng = random.Random(seed)
    n = len(numerator)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        below = sum(denominator[i] for i in picks)
        if below == 0:
            return None
        ratios.append(sum(numerator[i] for i in picks) / below)
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * (resamples - 1))], ratios[int((1 - tail) * (resamples - 1) + 0.5)]
