"""DNS server statistics: plain dicts on the hot path, Prometheus families at scrape time
(the counters of :mod:`units.metrics`, as the router's). The query-duration histogram has one
series (no labels), which the UDP loop keeps and adds to in place."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from units.metrics import LabelledCounter, LabelledHistogram

# A cached answer takes ~10 us of Python; a forwarded one, an upstream round trip (ms).
DURATION_BUCKETS: tuple[float, ...] = (
    *(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005),
    *(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


class DnsStats(Collector):
    """Every statistic of one DNS server."""

    def __init__(self) -> None:
        self.queries = LabelledCounter(
            "pointsman_dns_queries_total",
            "DNS queries answered, by service asked about (empty for other names), question type, "
            "response code and transport (udp, tcp)",
            ("service", "qtype", "rcode", "transport"),
        )
        self.duration = LabelledHistogram(
            "pointsman_dns_query_duration_seconds",
            "Time from a query's arrival to its answer being handed to the socket (forwarded "
            "queries include the upstream round trip)",
            (),
            DURATION_BUCKETS,
        )
        # The one series: exported (at 0) from the start; the UDP loop adds to it in place.
        self.duration_row = self.duration.row(())
        self.forwarded = LabelledCounter(
            "pointsman_dns_forwarded_total",
            "Queries for names outside the domain sent upstream, by result (ok, timeout, error, "
            "overload) plus tcp_retry for each answer fetched again over TCP after TC",
            ("result",),
        )
        self.dropped = LabelledCounter(
            "pointsman_dns_dropped_total",
            "Messages dropped without an answer, by reason (short: no complete header, response: "
            "QR set, tcp_framing: a TCP length under 12, tcp_limit: a connection over the limit, "
            "udp_send_buffer: the socket's send buffer was full)",
            ("reason",),
        )
        # Read at scrape time from the server's cache and TCP server (set by DnsServer).
        self.cache_builds: Callable[[], int] = lambda: 0
        self.cache_entries: Callable[[], int] = lambda: 0
        self.tcp_connections: Callable[[], int] = lambda: 0

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        yield self.queries.collect()
        yield self.duration.collect()
        yield self.forwarded.collect()
        yield self.dropped.collect()
        yield CounterMetricFamily(
            "pointsman_dns_cache_builds_total", "Answers encoded into the cache (misses)", value=self.cache_builds()
        )
        yield GaugeMetricFamily(
            "pointsman_dns_cache_entries", "Encoded answers in the cache", value=self.cache_entries()
        )
        yield GaugeMetricFamily(
            "pointsman_dns_tcp_connections", "Open TCP client connections", value=self.tcp_connections()
        )
