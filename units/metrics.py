"""The plain counters behind every ``/metrics`` family: dict entries on the hot path,
Prometheus families at scrape time.

prometheus_client's Counter takes a lock per increment; at tens of thousands of requests,
statements or DNS queries a second that lock would cost more than the work counted. Everything
runs on one event loop, so the data planes add to plain dict entries (``values[key] += 1``) and
a ``Collector`` turns them into families when ``/metrics`` is scraped. Shared by the router,
the SQL listeners and the DNS server (which, by DESIGN's import rule, may not import the router).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def fold(
    values: Mapping[tuple[str, ...], Any], project: Callable[[tuple[str, ...]], tuple[str, ...]]
) -> dict[tuple[str, ...], Any]:
    """Rows re-keyed by ``project`` and summed where keys meet (the live views show apps and
    routes, not every instance behind them). Values are counts, or histogram rows (lists,
    added element-wise)."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in values.items():
        short = project(key)
        have = out.get(short)
        if have is None:
            out[short] = list(value) if isinstance(value, list) else value
        elif isinstance(value, list):
            out[short] = [a + b for a, b in zip(have, value, strict=True)]
        else:
            out[short] = have + value
    return out


class LabelledCounter:
    __slots__ = ("documentation", "labels", "name", "values")

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.values: defaultdict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, key: tuple[str, ...], amount: float = 1) -> None:
        self.values[key] += amount

    def get(self, key: tuple[str, ...]) -> float:
        return self.values.get(key, 0.0)

    def total(self) -> float:
        return sum(self.values.values())

    def collect(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        if not self.labels and not self.values:
            # A counter without labels is exported from the start, at 0, so that rate() and
            # alerts on it work before its first increment.
            family.add_metric((), 0.0)
        for key, value in self.values.items():
            family.add_metric(key, value)
        return family


class LabelledHistogram:
    __slots__ = ("buckets", "documentation", "labels", "name", "series")

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...] = DURATION_BUCKETS
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.buckets = buckets
        # per label key: [count per bucket (+Inf last)..., sum]
        self.series: dict[tuple[str, ...], list[float]] = {}

    def row(self, key: tuple[str, ...]) -> list[float]:
        """The series of ``key``, created at 0 if new: a hot path that observes one series
        keeps it and adds to it in place (``row[bisect_left(buckets, v)] += 1; row[-1] += v``)."""
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0.0] * (len(self.buckets) + 2)
        return row

    def observe(self, key: tuple[str, ...], value: float) -> None:
        row = self.row(key)
        row[bisect.bisect_left(self.buckets, value)] += 1
        row[-1] += value

    def count(self, key: tuple[str, ...]) -> float:
        row = self.series.get(key)
        return sum(row[:-1]) if row else 0.0

    def collect(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, row in self.series.items():
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*self.buckets, float("inf")), row[:-1], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric(list(key), buckets, row[-1])
        return family
