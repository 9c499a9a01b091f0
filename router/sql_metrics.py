"""SQL statistics of the PostgreSQL (later MySQL) listeners: plain counters, read at scrape.

Same approach as :mod:`router.metrics`: the session filter (l7/pg_filter.py) adds to dict
entries, the collector turns them into Prometheus families. "INSERTs per second from app A"
is ``sum by (app) (rate(pointsman_sql_statements_total{verb="INSERT", app="A"}[1m]))``.

:meth:`SqlStats.snapshot` serves ``GET /sql/stats`` and ``pointsman top``: totals per
(listener, app, verb) with latency figures, plus rates over the last seconds from a ring of
samples that :meth:`SqlStats.sample` records once a second.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from l7.classify import SqlClassifier
from router.metrics import LabelledCounter, LabelledHistogram

SQL_DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class SqlStats(Collector):
    """Counters of every SQL listener of the process; lives across reloads."""

    def __init__(self) -> None:
        c = LabelledCounter
        self.statements = c(
            "pointsman_sql_statements_total",
            "SQL statements sent to the server, by listener, app, database and verb",
            ("listener", "app", "database", "verb"),
        )
        self.durations = LabelledHistogram(
            "pointsman_sql_statement_duration_seconds",
            "Time from sending a statement to its CommandComplete",
            ("listener", "app", "verb"),
            SQL_DURATION_BUCKETS,
        )
        self.denied = c(
            "pointsman_sql_denied_total",
            "Statements refused by policy (deny, or rate limit over with deny)",
            ("listener", "app", "rule"),
        )
        self.delayed = c(
            "pointsman_sql_delayed_total", "Statements held back by a rate limit", ("listener", "app", "rule")
        )
        self.errors = c(
            "pointsman_sql_errors_total",
            "ErrorResponses from the server (and policy refusals), by SQLSTATE class",
            ("listener", "app", "sqlstate_class"),
        )
        self.transactions = c(
            "pointsman_sql_transactions_total",
            "Transactions ended, by outcome (committed, rolled_back)",
            ("listener", "app", "outcome"),
        )
        self.sessions = c("pointsman_sql_sessions_total", "SQL sessions started", ("listener", "app"))
        self.active = c("pointsman_sql_active_sessions", "SQL sessions open now", ("listener", "app"))
        self.policy_matches = c(
            "pointsman_sql_policy_matches_total",
            "Policy rules that applied to a statement, by rule and action",
            ("rule", "action"),
        )
        self.decode_errors = c(
            "pointsman_sql_decode_errors_total",
            "Connections whose bytes the decoder could not follow, by side",
            ("listener", "side"),
        )
        self.counters = [
            self.statements,
            self.denied,
            self.delayed,
            self.errors,
            self.transactions,
            self.sessions,
            self.policy_matches,
            self.decode_errors,
        ]
        # Shared by every postgres listener: one cache, one hit rate.
        self.classifier = SqlClassifier("postgres", cache_size=8192)
        self.classifier_bs = SqlClassifier("postgres", cache_size=1024, backslash_escapes=True)
        self._samples: deque[tuple[float, dict[tuple[str, ...], float], dict[tuple[str, ...], float]]] = deque(
            maxlen=16
        )

    # -- Prometheus ----------------------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        for counter in self.counters:
            yield counter.collect()
        yield self.durations.collect()
        active = GaugeMetricFamily(self.active.name, self.active.documentation, labels=self.active.labels)
        for key, value in self.active.values.items():
            active.add_metric(key, value)
        yield active
        for name, attr in (("hits", "hits"), ("misses", "misses")):
            family = CounterMetricFamily(
                f"pointsman_sql_classify_cache_{name}",
                f"Statement classification cache {name} (digest LRU)",
                labels=("dialect",),
            )
            family.add_metric(
                ("postgres",), float(getattr(self.classifier.cache, attr) + getattr(self.classifier_bs.cache, attr))
            )
            yield family

    # -- live view -----------------------------------------------------------------------------

    def sample(self, now: float | None = None) -> None:
        """Record the counters now (called once a second) so that rates can be given."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, dict(self.statements.values), dict(self.denied.values)))

    def snapshot(self, window: float = 5.0) -> dict[str, Any]:
        """Per listener/app/verb: total, rate (per second over ``window``), latency mean and
        bucket-estimated p50/p99; denials per rule; cache hit rate."""
        now = time.monotonic()
        base = None
        for sample in self._samples:
            if now - sample[0] <= window + 0.5:
                base = sample
                break
        span = (now - base[0]) if base is not None else 0.0
        rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        for (listener, app, _database, verb), total in self.statements.values.items():
            row = rows.setdefault(
                (listener, app, verb),
                {"listener": listener, "app": app, "verb": verb, "total": 0.0, "rate": 0.0},
            )
            row["total"] += total
        if base is not None and span > 0:
            old: dict[tuple[str, str, str], float] = {}
            for (listener, app, _database, verb), total in base[1].items():
                old[(listener, app, verb)] = old.get((listener, app, verb), 0.0) + total
            for key, row in rows.items():
                row["rate"] = round((row["total"] - old.get(key, 0.0)) / span, 2)
        for key, row in rows.items():
            series = self.durations.series.get(key)
            row.update(_latency(series, self.durations.buckets))
        denied = [
            {"listener": listener, "app": app, "rule": rule, "total": total}
            for (listener, app, rule), total in self.denied.values.items()
        ]
        cache = self.classifier.cache
        lookups = cache.hits + cache.misses
        return {
            "window_seconds": round(span, 2),
            "statements": sorted(rows.values(), key=lambda r: (-r["rate"], -r["total"])),
            "denied": denied,
            "sessions": [
                {"listener": listener, "app": app, "active": value}
                for (listener, app), value in self.active.values.items()
            ],
            "classify_cache": {
                "hits": cache.hits,
                "misses": cache.misses,
                "hit_rate": round(cache.hits / lookups, 4) if lookups else None,
            },
        }


def _latency(series: list[float] | None, buckets: tuple[float, ...]) -> dict[str, float | None]:
    if not series:
        return {"mean_ms": None, "p50_ms": None, "p99_ms": None}
    counts = series[:-1]
    n = sum(counts)
    if not n:
        return {"mean_ms": None, "p50_ms": None, "p99_ms": None}
    return {
        "mean_ms": round(series[-1] / n * 1000, 3),
        "p50_ms": _quantile(counts, buckets, n, 0.5),
        "p99_ms": _quantile(counts, buckets, n, 0.99),
    }


def _quantile(counts: list[float], buckets: tuple[float, ...], n: float, q: float) -> float | None:
    """Upper bound of the bucket holding the q-quantile, in ms (as Prometheus would bound it)."""
    seen = 0.0
    for bound, count in zip((*buckets, float("inf")), counts, strict=True):
        seen += count
        if seen >= q * n:
            return None if bound == float("inf") else round(bound * 1000, 3)
    return None
