"""Router statistics: plain counters on the hot path, turned into Prometheus families at scrape.

prometheus_client's Counter/Histogram take a lock on every increment, which costs more than
the rest of a proxied request's bookkeeping. Like Envoy's stats, the data plane increments
plain dict entries (the event loop is single-threaded, so no lock is needed) and a collector
reads them when ``/metrics`` is scraped. Names follow ``pointsman_<area>_<thing>_<unit>``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from l7.model import IDENTITY_LABELS
from units.metrics import LabelledCounter, LabelledHistogram


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
