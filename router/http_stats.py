"""HTTP statistics for ``GET /http/stats`` and ``pointsman top``: the HTTP counterpart of
:meth:`router.sql_metrics.SqlStats.snapshot`.

Nothing here runs per request. The data plane already counts every answered request in
:class:`router.metrics.RouterStats` (``http_requests`` by listener, client identity, route,
cluster and status class; ``http_duration`` by listener, identity and route; the live view
sums over identities); :meth:`HttpStats.sample` copies those plain
dicts once a second (the supervisor's sampler task) and :meth:`HttpStats.snapshot` takes
differences between two samples. So rates *and* latencies are over the same sliding window,
unlike the SQL view, whose latencies cover the life of the process.

What the counters cannot tell apart: a 5xx from the upstream and one of the proxy's own
(502 reset, 503 no healthy upstream or connect error, 504 timeout) are both in the ``5xx``
class. Only the circuit-breaker 503s have a counter of their own (``upstream_overflows``),
shown per cluster.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from l7.model import IDENTITY_LABELS
from router.metrics import RouterStats
from router.sql_metrics import _latency
from units.metrics import fold

_Key = tuple[str, ...]


class _Sample:
    __slots__ = ("at", "durations", "overflows", "rejected", "requests")

    def __init__(self, at: float, stats: RouterStats) -> None:
        self.at = at
        self.requests: dict[_Key, float] = _per_route(stats.http_requests.values)
        # Each histogram row is [count per bucket..., +Inf count, sum]: copied (fold builds new
        # lists), not aliased, because the data plane adds to the same lists in place.
        self.durations: dict[_Key, list[float]] = _per_route(stats.http_duration.series)
        self.rejected: dict[_Key, float] = dict(stats.http_rejected.values)
        self.overflows: dict[_Key, float] = dict(stats.upstream_overflows.values)


def _per_route(values: dict[_Key, Any]) -> dict[_Key, Any]:
    """HTTP series keyed (listener, app, version, instance, node, rest...) summed over the
    client identity: (listener, rest...)."""
    return fold(values, lambda key: (key[0], *key[1 + len(IDENTITY_LABELS) :]))


# How far past the window a sample may lie and still count as inside it: the sampler's
# one-second sleeps drift a little late (same slack as the SQL view).
_SAMPLE_SLACK = 0.5


class HttpStats:
    """A ring of samples of a :class:`RouterStats`' HTTP counters, and the snapshot over it."""

    def __init__(self, stats: RouterStats, keep: int = 16) -> None:
        self.stats = stats
        self._samples: deque[_Sample] = deque(maxlen=keep)

    def sample(self, now: float | None = None) -> None:
        """Record the counters (once a second). ``now`` is a ``time.monotonic()`` reading;
        tests pass their own to get exact rates."""
        self._samples.append(_Sample(time.monotonic() if now is None else now, self.stats))

    def _pair(self, window: float, now: float) -> tuple[_Sample | None, _Sample | None]:
        """The newest sample taken by ``now`` and the oldest one within ``window`` before it;
        (None, None) when the newest is stale (the sampler stopped) or there is none."""
        taken = [s for s in self._samples if s.at <= now]
        if not taken or now - taken[-1].at > window + _SAMPLE_SLACK:
            return None, None
        newest = taken[-1]
        for sample in taken[:-1]:
            if newest.at - sample.at <= window + _SAMPLE_SLACK:
                return newest, sample
        return newest, None

    def snapshot(self, window: float = 5.0, now: float | None = None) -> dict[str, Any]:
        """What ``GET /http/stats`` serves.

        ``routes``: per (listener, route, cluster), totals read live (all and per status
        class) and, over the window, requests/s, 5xx/s and the latency (mean, p50, p99 in
        ms) of the requests that completed in it. The duration histogram is kept per
        (listener, route), so the clusters of a split route show the route's latency.
        A request that matched no route is counted with route and cluster "".
        ``listeners``: client connections open now and requests refused before routing.
        ``clusters``: (those the routes sent to) requests in flight, upstream connections
        open, circuit-breaker 503s. Without two samples within the window every rate is 0,
        every latency None and ``window_seconds`` 0."""
        now = time.monotonic() if now is None else now
        newest, base = self._pair(window, now)
        span = newest.at - base.at if newest is not None and base is not None else 0.0

        def rate(new: float, old: float) -> float:
            # Counters only grow; max() keeps a negative figure out should one ever reset.
            return round(max(0.0, new - old) / span, 2) if span > 0 else 0.0

        stats = self.stats
        new_req = newest.requests if newest is not None else {}
        old_req = base.requests if base is not None else {}

        rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        for (listener, route, cluster, code), total in _per_route(stats.http_requests.values).items():
            row = rows.get((listener, route, cluster))
            if row is None:
                row = rows[(listener, route, cluster)] = {
                    "listener": listener,
                    "route": route,
                    "cluster": cluster,
                    "total": 0.0,
                    "codes": {},
                    "rate": 0.0,
                    "errors_total": 0.0,
                    "error_rate": 0.0,
                }
            key = (listener, route, cluster, code)
            r = rate(new_req.get(key, 0.0), old_req.get(key, 0.0))
            row["total"] += total
            row["codes"][code] = total
            row["rate"] += r
            if code == "5xx":
                row["errors_total"] += total
                row["error_rate"] += r

        latency: dict[_Key, dict[str, float | None]] = {}
        buckets = stats.http_duration.buckets
        for route_key in {(row["listener"], row["route"]) for row in rows.values()}:
            diff: list[float] | None = None
            if span > 0 and newest is not None and base is not None:
                new_row = newest.durations.get(route_key)
                if new_row is not None:
                    old_row = base.durations.get(route_key) or [0.0] * len(new_row)
                    diff = [max(0.0, a - b) for a, b in zip(new_row, old_row, strict=True)]
            latency[route_key] = _latency(diff, buckets)
        for row in rows.values():
            row["rate"] = round(row["rate"], 2)
            row["error_rate"] = round(row["error_rate"], 2)
            row.update(latency[(row["listener"], row["route"])])

        listeners = sorted({row["listener"] for row in rows.values()})
        new_rej = newest.rejected if newest is not None else {}
        old_rej = base.rejected if base is not None else {}
        listener_rows = []
        for name in listeners:
            keys = [k for k in stats.http_rejected.values if k[0] == name]
            listener_rows.append(
                {
                    "listener": name,
                    "active_connections": stats.downstream_active.get(name, 0),
                    "rejected_total": sum(stats.http_rejected.values[k] for k in keys),
                    "rejected_rate": round(sum(rate(new_rej.get(k, 0.0), old_rej.get(k, 0.0)) for k in keys), 2),
                }
            )

        used = {row["cluster"] for row in rows.values() if row["cluster"]}
        new_ovf = newest.overflows if newest is not None else {}
        old_ovf = base.overflows if base is not None else {}
        cluster_rows = []
        for cluster in stats.clusters_source():
            if cluster.name not in used:
                continue
            keys = [k for k in stats.upstream_overflows.values if k[0] == cluster.name]
            cluster_rows.append(
                {
                    "cluster": cluster.name,
                    "in_flight": sum(e.active for e in cluster.endpoints),
                    "connections": sum(e.connections for e in cluster.endpoints),
                    "overflow_total": sum(stats.upstream_overflows.values[k] for k in keys),
                    "overflow_rate": round(sum(rate(new_ovf.get(k, 0.0), old_ovf.get(k, 0.0)) for k in keys), 2),
                }
            )

        def busiest(row: dict[str, Any]) -> tuple[Any, ...]:
            # Ties (every rate is 0 at start) fall back to the totals, then to the labels, so
            # the order stays put from one refresh to the next.
            return (-row["rate"], -row["total"], row["listener"], row["route"], row["cluster"])

        return {
            "window_seconds": round(span, 2),
            "routes": sorted(rows.values(), key=busiest),
            "listeners": listener_rows,
            "clusters": sorted(cluster_rows, key=lambda row: row["cluster"]),
        }
