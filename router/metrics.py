"""Router statistics: plain counters on the hot path, turned into Prometheus families at scrape.

prometheus_client's Counter/Histogram take a lock on every increment, which costs more than
the rest of a proxied request's bookkeeping. Like Envoy's stats, the data plane increments
plain dict entries (the event loop is single-threaded, so no lock is needed) and a collector
reads them when ``/metrics`` is scraped. Names follow ``pointsman_<area>_<thing>_<unit>``.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from l7.model import IDENTITY_LABELS

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

    def observe(self, key: tuple[str, ...], value: float) -> None:
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0.0] * (len(self.buckets) + 2)
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


class RouterStats(Collector):
    """Every statistic the router keeps. One instance lives as long as the process, across
    reloads, so counters never reset when the config changes."""

    def __init__(self) -> None:
        c, h = LabelledCounter, LabelledHistogram
        self.http_requests = c(
            "pointsman_http_requests_total",
            "HTTP requests answered, by listener, client identity, route, cluster and status class",
            ("listener", *IDENTITY_LABELS, "route", "cluster", "code"),
        )
        self.http_duration = h(
            "pointsman_http_request_duration_seconds",
            "Time from the request's first byte to the response's last byte",
            ("listener", *IDENTITY_LABELS, "route"),
        )
        self.http_retries = c(
            "pointsman_http_retries_total",
            "Upstream request retries",
            ("listener", *IDENTITY_LABELS, "route", "cluster"),
        )
        self.http_rejected = c(
            "pointsman_http_rejected_requests_total",
            "Requests refused before routing, by reason (malformed, header_too_large, "
            "header_timeout, ambiguous_length)",
            ("listener", "reason"),
        )
        self.downstream_connections = c(
            "pointsman_downstream_connections_total", "Client connections accepted", ("listener",)
        )
        self.downstream_active: defaultdict[str, int] = defaultdict(int)  # listener -> open client connections
        self.upstream_connections = c(
            "pointsman_upstream_connections_total", "Upstream connections opened", ("cluster",)
        )
        self.upstream_connect_failures = c(
            "pointsman_upstream_connect_failures_total", "Upstream connection attempts that failed", ("cluster",)
        )
        self.upstream_overflows = c(
            "pointsman_upstream_overflow_total",
            "Requests refused with 503 because a circuit-breaker limit was full",
            ("cluster", "limit"),
        )
        self.tcp_bytes = c("pointsman_tcp_bytes_total", "Bytes forwarded by TCP listeners", ("listener", "direction"))
        self.tcp_connections = c(
            "pointsman_tcp_connections_total",
            "TCP sessions forwarded, by listener and cluster",
            ("listener", "cluster"),
        )
        self.reloads = c("pointsman_config_reloads_total", "Config reloads, by result", ("result",))
        self.reload_failures = c(
            "pointsman_config_reload_failures_total", "Config reloads refused because the new config was invalid", ()
        )
        self.counters = [
            self.http_requests,
            self.http_retries,
            self.http_rejected,
            self.downstream_connections,
            self.upstream_connections,
            self.upstream_connect_failures,
            self.upstream_overflows,
            self.tcp_bytes,
            self.tcp_connections,
            self.reloads,
            self.reload_failures,
        ]
        self.histograms = [self.http_duration]
        # Gauges read live state; the owner of that state sets these callables.
        self.clusters_source: Callable[[], Iterator[Any]] = lambda: iter(())
        self.config_hash = ""

    def collect(self) -> Iterator[Any]:
        for counter in self.counters:
            yield counter.collect()
        for histogram in self.histograms:
            yield histogram.collect()
        active = GaugeMetricFamily(
            "pointsman_downstream_active_connections", "Client connections open now", labels=("listener",)
        )
        for listener, value in self.downstream_active.items():
            active.add_metric((listener,), value)
        yield active
        healthy = GaugeMetricFamily(
            "pointsman_upstream_endpoint_healthy",
            "1 when the endpoint passes active health checks",
            labels=("cluster", "endpoint"),
        )
        ejected = GaugeMetricFamily(
            "pointsman_upstream_endpoint_ejected",
            "1 while the endpoint is ejected by outlier detection",
            labels=("cluster", "endpoint"),
        )
        ejections = CounterMetricFamily(
            "pointsman_upstream_endpoint_ejections",
            "Times the endpoint was ejected by outlier detection",
            labels=("cluster", "endpoint"),
        )
        open_conns = GaugeMetricFamily(
            "pointsman_upstream_active_connections", "Upstream connections open now", labels=("cluster", "endpoint")
        )
        in_flight = GaugeMetricFamily(
            "pointsman_upstream_active_requests", "Requests in flight to the endpoint", labels=("cluster", "endpoint")
        )
        for cluster in self.clusters_source():
            for e in cluster.endpoints:
                key = (cluster.name, e.key)
                healthy.add_metric(key, 1.0 if e.healthy else 0.0)
                ejected.add_metric(key, 1.0 if e.ejected else 0.0)
                ejections.add_metric(key, e.ejections)
                open_conns.add_metric(key, e.connections)
                in_flight.add_metric(key, e.active)
        yield from (healthy, ejected, ejections, open_conns, in_flight)
        info = GaugeMetricFamily("pointsman_config_info", "The running config's hash", labels=("hash",))
        if self.config_hash:
            info.add_metric((self.config_hash,), 1.0)
        yield info
