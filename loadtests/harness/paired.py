"""Statistics of paired runs: two configurations run back to back, compared within each pair.

A machine drifts over minutes, so a figure from one run compared with a figure
from a run minutes later measures the drift as much as the change. Within a
pair (run back to back, order alternated between pairs) both runs see about
the same machine; the pair's ratio is the sample, and its spread over the
pairs is what the comparison is worth.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

CONFIDENCE = 0.95


def t_interval(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """Student-t interval of the mean of `values` (None for fewer than two)."""
    from scipy import stats

    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    stderr = statistics.stdev(values) / len(values) ** 0.5
    half = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1)) * stderr
    return mean - half, mean + half


def spread(values: Sequence[float]) -> float | None:
    """(max - min) / median: how far the repeats disagree (None for fewer than two)."""
    if len(values) < 2:
        return None
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else None


def first(index: int, a: int, b: int) -> tuple[int, int]:
    """The order of pair `index`: a first in even pairs, b first in odd ones."""
    return (a, b) if index % 2 == 0 else (b, a)
