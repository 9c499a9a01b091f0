"""SQL statistics of the PostgreSQL and MySQL listeners: plain counters, read at scrape.

Same approach as :mod:`router.metrics`: the session filters (l7/pg_filter.py, l7/mysql_filter.py) add to dict
entries, the collector turns them into Prometheus families. "INSERTs per second from app A"
is ``sum by (app) (rate(pointsman_sql_statements_total{verb="INSERT", app="A"}[1m]))``.

:meth:`SqlStats.snapshot` serves ``GET /sql/stats`` and ``pointsman top``: totals per
(listener, app, verb) with latency figures, plus rates over the last seconds from a ring of
samples that :meth:`SqlStats.sample` records once a second.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from l7.classify import SqlClassifier
from l7.model import IDENTITY_LABELS
from units.metrics import LabelledCounter, LabelledHistogram, fold

# The label prefix of every per-session series: the listener, its wire protocol (so that one
# dashboard serves PostgreSQL and MySQL listeners) and the client's identity (l7.model.Identity).
WHO = ("listener", "protocol", *IDENTITY_LABELS)

# See SqlStats.app_label.
CLAIMED_APPS_MAX = 1000
OTHER_APPS = "_other"

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
            (*WHO, "database", "verb"),
        )
        self.durations = LabelledHistogram(
            "pointsman_sql_statement_duration_seconds",
            "Time from sending a statement to its CommandComplete",
            (*WHO, "verb"),
            SQL_DURATION_BUCKETS,
        )
        self.denied = c(
            "pointsman_sql_denied_total",
            "Statements refused by policy (deny, or rate limit over with deny)",
            (*WHO, "rule"),
        )
        self.delayed = c("pointsman_sql_delayed_total", "Statements held back by a rate limit", (*WHO, "rule"))
        self.errors = c(
            "pointsman_sql_errors_total",
            "ErrorResponses from the server (and policy refusals), by SQLSTATE class",
            (*WHO, "sqlstate_class"),
        )
        self.transactions = c(
            "pointsman_sql_transactions_total",
            "Transactions ended, by outcome (committed, rolled_back)",
            (*WHO, "outcome"),
        )
        self.sessions = c("pointsman_sql_sessions_total", "SQL sessions started", WHO)
        self.active = c("pointsman_sql_active_sessions", "SQL sessions open now", WHO)
        self.policy_matches = c(
            "pointsman_sql_policy_matches_total",
            "Policy rules that applied to a statement, by rule and action",
            ("rule", "action"),
        )
        self.decode_errors = c(
            "pointsman_sql_decode_errors_total",
            "Connections whose bytes the decoder could not follow, by side",
            ("listener", "protocol", "side"),
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
        # Apps clients named themselves (application_name, program_name, user), as labels: the
        # first CLAIMED_APPS_MAX distinct ones keep their names, later ones share OTHER_APPS, so
        # a client inventing names cannot grow /metrics without end.
        self._claimed_apps: set[str] = set()
        # Shared by every listener of a protocol: one cache, one hit rate per dialect. The second
        # of each pair lexes strings the other way (postgres: standard_conforming_strings off;
        # mysql: NO_BACKSLASH_ESCAPES).
        self.classifier = SqlClassifier("postgres", cache_size=8192)
        self.classifier_bs = SqlClassifier("postgres", cache_size=1024, backslash_escapes=True)
        self.classifier_mysql = SqlClassifier("mysql", cache_size=8192)
        self.classifier_mysql_nobs = SqlClassifier("mysql", cache_size=1024, backslash_escapes=False)
        self._samples: deque[tuple[float, dict[tuple[str, ...], float], dict[tuple[str, ...], float]]] = deque(
            maxlen=16
        )

    def app_label(self, app: str) -> str:
        claimed = self._claimed_apps
        if app in claimed:
            return app
        if len(claimed) >= CLAIMED_APPS_MAX:
            return OTHER_APPS
        claimed.add(app)
        return app

    def classifiers(self, protocol: str) -> tuple[SqlClassifier, SqlClassifier]:
        """The (usual, other string lexing) classifier pair of a protocol's listeners."""
        if protocol == "mysql":
            return self.classifier_mysql, self.classifier_mysql_nobs
        return self.classifier, self.classifier_bs

    def _dialects(self) -> Iterator[tuple[str, tuple[SqlClassifier, SqlClassifier]]]:
        yield "postgres", self.classifiers("postgres")
        yield "mysql", self.classifiers("mysql")

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
            for dialect, pair in self._dialects():
                family.add_metric((dialect,), float(sum(getattr(c, attr) for c in pair)))
            yield family

    # -- live view -----------------------------------------------------------------------------

    def sample(self, now: float | None = None) -> None:
        """Record the counters (the supervisor calls this once a second) so that
        :meth:`snapshot` can give rates. ``now`` is a ``time.monotonic()`` reading; tests pass
        their own to get exact rates."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, dict(self.statements.values), dict(self.denied.values)))

    def snapshot(self, window: float = 5.0, now: float | None = None) -> dict[str, Any]:
        """What ``GET /sql/stats`` serves and ``pointsman top`` shows.

        Per listener/app/verb: total, rate, mean and p50/p99 latency; per listener/app/rule:
        denials with their rate; open sessions; the classification cache's hit rate.

        Totals are read live. Rates are the difference between two samples, the newest and
        the oldest within ``window`` seconds of it, over the time between them: the same
        figure for every poll between two samples, instead of one that jitters with where
        the poll falls. Without two such samples (just started, or the sampler stalled for
        longer than the window) every rate is 0 and ``window_seconds`` is 0. Latencies cover
        the life of the process: the histogram is not sampled."""
        now = time.monotonic() if now is None else now
        newest, base = self._rate_samples(window, now)
        span = newest[0] - base[0] if newest is not None and base is not None else 0.0

        def rate(new: float, old: float) -> float:
            # The counters only grow; max() keeps a negative figure out if one ever resets.
            return round(max(0.0, new - old) / span, 2) if span > 0 else 0.0

        statement_rows: list[dict[str, Any]] = []
        new_counts = _per_verb(newest[1]) if newest is not None else {}
        old_counts = _per_verb(base[1]) if base is not None else {}
        durations = _per_app(self.durations.series)
        for key, total in _per_verb(self.statements.values).items():
            listener, app, verb = key
            statement_rows.append(
                {
                    "listener": listener,
                    "app": app,
                    "verb": verb,
                    "total": total,
                    "rate": rate(new_counts.get(key, 0.0), old_counts.get(key, 0.0)),
                    **_latency(durations.get(key), self.durations.buckets),
                }
            )

        new_denied = newest[2] if newest is not None else {}
        old_denied = base[2] if base is not None else {}
        denied_rows: list[dict[str, Any]] = []
        new_denied, old_denied = _per_app(new_denied), _per_app(old_denied)
        for labels, total in _per_app(self.denied.values).items():
            listener, app, rule = labels
            denied_rows.append(
                {
                    "listener": listener,
                    "app": app,
                    "rule": rule,
                    "total": total,
                    "rate": rate(new_denied.get(labels, 0.0), old_denied.get(labels, 0.0)),
                }
            )

        # Every classifier, as /metrics counts them: one hit rate for all of them.
        pairs = [c for _, pair in self._dialects() for c in pair]
        hits = sum(c.hits for c in pairs)
        misses = sum(c.misses for c in pairs)
        lookups = hits + misses

        def busiest(*names: str) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
            # Ties (every rate is 0 at start) fall back to the totals, then to the labels, so
            # the order stays put from one refresh to the next.
            return lambda row: (-row["rate"], -row["total"], *(row[name] for name in names))

        return {
            "window_seconds": round(span, 2),
            "statements": sorted(statement_rows, key=busiest("listener", "app", "verb")),
            "denied": sorted(denied_rows, key=busiest("listener", "app", "rule")),
            "sessions": [
                {"listener": listener, "app": app, "active": value}
                for (listener, app), value in sorted(_per_app(self.active.values).items())
            ],
            "classify_cache": {
                "hits": hits,
                "misses": misses,
                "hit_rate": round(hits / lookups, 4) if lookups else None,
            },
        }

    def _rate_samples(self, window: float, now: float) -> tuple[_Sample | None, _Sample | None]:
        """The newest sample taken by ``now`` and the oldest one within ``window`` before it;
        either is None when there is no pair to take a rate from."""
        taken = [s for s in self._samples if s[0] <= now]
        if not taken or now - taken[-1][0] > window + _SAMPLE_SLACK:
            return None, None
        newest = taken[-1]
        for sample in taken[:-1]:
            # The slack lets the sample from ~window seconds ago in although the sampler's
            # one-second sleeps drift a little late.
            if newest[0] - sample[0] <= window + _SAMPLE_SLACK:
                return newest, sample
        return newest, None


# (monotonic time, statements.values copy, denied.values copy), as SqlStats.sample records them
_Sample = tuple[float, dict[tuple[str, ...], float], dict[tuple[str, ...], float]]

# How far past the window a sample may lie and still count as inside it (see _rate_samples).
_SAMPLE_SLACK = 0.5


def _per_verb(values: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    """Statement counts summed over protocol, version, instance, node and database: (who...,
    database, verb) -> (listener, app, verb), the rows top shows."""
    return fold(values, lambda key: (key[0], key[2], key[-1]))


def _per_app(values: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
    """Rows keyed (who..., rest...) summed to (listener, app, rest...): top shows apps, not
    their instances."""
    return fold(values, lambda key: (key[0], key[2], *key[len(WHO) :]))


def _latency(series: list[float] | None, buckets: tuple[float, ...]) -> dict[str, float | None]:
    """Mean, p50 and p99 in ms of one histogram row ([count per bucket..., +Inf count, sum])."""
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
    """The q-quantile in ms, interpolated linearly inside the bucket that holds it.

    This is what Prometheus' ``histogram_quantile()`` computes from the same buckets, so top
    and a dashboard agree: the observations are assumed spread evenly across their bucket,
    and the first bucket starts at 0 (a duration is never negative). The +Inf bucket has no
    upper bound to interpolate towards; as in Prometheus, a quantile that falls there is
    given as the highest finite bound, a floor of the true value.

    ``counts`` holds one count per bucket (not cumulative), +Inf last; ``n`` is their sum.
    """
    if n <= 0 or not 0 < q <= 1 or not buckets:
        return None
    rank = q * n
    below = 0.0  # observations in the buckets before this one
    lower = 0.0
    for upper, count in zip(buckets, counts[:-1], strict=True):
        # below < rank holds here (rank > 0, and a bucket that reached it returned), so a
        # bucket that reaches it has count > 0.
        if below + count >= rank:
            return round((lower + (upper - lower) * (rank - below) / count) * 1000, 3)
        below += count
        lower = upper
    return round(buckets[-1] * 1000, 3)
