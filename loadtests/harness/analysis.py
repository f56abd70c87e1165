"""Turning a run's request rows into figures: rates, percentiles, windows."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from loadtests.harness.loadrun import LoadResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def window(result: LoadResult, start_s: float, end_s: float) -> list[list[Any]]:
    """Rows whose request started within [start_s, end_s) of the load's start."""
    t = result.column("t")
    lo, hi = result.started + start_s, result.started + end_s
    return [row for row in result.rows if lo <= row[t] < hi]


def summarize(result: LoadResult, rows: Iterable[list[Any]], seconds: float) -> dict[str, Any]:
    ok_col, latency, node = result.column("ok"), result.column("latency_ms"), result.column("node")
    name = result.column("name")
    rows = list(rows)
    good = [r for r in rows if r[ok_col]]
    latencies = [r[latency] for r in good]
    return {
        "requests": len(rows),
        "failed": len(rows) - len(good),
        "throughput_rps": len(good) / seconds if seconds > 0 else 0.0,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "by_node": dict(Counter(r[node] for r in good if r[node])),
        "by_kind": dict(Counter(r[name] for r in good)),
    }


def per_second(result: LoadResult) -> list[dict[str, Any]]:
    """A timeline: for each second of the load, ok requests by node, failures, p50/p99."""
    t, ok_col = result.column("t"), result.column("ok")
    node, latency = result.column("node"), result.column("latency_ms")
    seconds = max(1, math.ceil(result.ended - result.started))
    bins: dict[int, list[list[Any]]] = defaultdict(list)
    for row in result.rows:
        second = int(row[t] - result.started)
        if 0 <= second < seconds:
            bins[second].append(row)
    timeline = []
    for second in range(seconds):
        rows = bins.get(second, [])
        good = [r for r in rows if r[ok_col]]
        latencies = [r[latency] for r in good]
        timeline.append(
            {
                "t": second,
                "ok_by_node": dict(Counter(r[node] or "?" for r in good)),
                "ok": len(good),
                "failed": len(rows) - len(good),
                "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99),
            }
        )
    return timeline
