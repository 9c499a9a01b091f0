"""DNS server statistics: plain dicts on the hot path, Prometheus families at scrape time.

prometheus_client's Counter takes a lock per increment; at tens of thousands of queries a
second that lock would be the most expensive thing the server does per query. The event loop
is single-threaded, so the server increments plain dict entries and :class:`DnsStats`
(a prometheus_client ``Collector``) turns them into families when ``/metrics`` is scraped.
Same pattern as the router's stats; not shared with it because ``discovery`` imports no other
package.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# A cached answer takes ~10 us of Python; a forwarded one, an upstream round trip (ms).
DURATION_BUCKETS: tuple[float, ...] = (
    *(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005),
    *(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


class Counter:
    __slots__ = ("documentation", "labels", "name", "values")

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        # Read and incremented directly on the hot path: ``values[key] += 1``.
        self.values: defaultdict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, key: tuple[str, ...], amount: float = 1) -> None:
        self.values[key] += amount

    def get(self, key: tuple[str, ...]) -> float:
        return self.values.get(key, 0.0)

    def total(self) -> float:
        return sum(self.values.values())

    def collect(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in sorted(self.values.items()):
            family.add_metric(key, value)
        return family


class Histogram:
    """One unlabelled histogram: a count per bucket (``+Inf`` last) and the sum."""

    __slots__ = ("buckets", "counts", "documentation", "name", "sum")

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.name = name
        self.documentation = documentation
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def collect(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative = 0
        rows: list[tuple[str, float]] = []
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += count
            rows.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
        family.add_metric([], rows, self.sum)
        return family


class DnsStats(Collector):
    """Every statistic of one DNS server."""

    def __init__(self) -> None:
        self.queries = Counter(
            "pointsman_dns_queries_total",
            "DNS queries answered, by service asked about (empty for other names), question type, "
            "response code and transport (udp, tcp)",
            ("service", "qtype", "rcode", "transport"),
        )
        self.duration = Histogram(
            "pointsman_dns_query_duration_seconds",
            "Time from a query's arrival to its answer being handed to the socket (forwarded "
            "queries include the upstream round trip)",
        )
        self.forwarded = Counter(
            "pointsman_dns_forwarded_total",
            "Queries for names outside the domain sent upstream, by result (ok, timeout, error, "
            "overload) plus tcp_retry for each answer fetched again over TCP after TC",
            ("result",),
        )
        self.dropped = Counter(
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
