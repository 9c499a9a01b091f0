"""The server's statistics as Prometheus sees them (the collector registered in a registry)."""

from __future__ import annotations

import dns.asyncquery
import dns.message
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.discovery.conftest import instance, running_dns, snapshot


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_counters_and_histogram() -> None:
    async with running_dns(snapshot(instance("web-1", "web", "10.0.0.1")), upstreams=[]) as (server, _):
        registry = CollectorRegistry(auto_describe=True)
        registry.register(server.collector)
        host, port = server.address
        for name, rdtype in (("web.svc.internal", "A"), ("web.svc.internal", "A"), ("nope.svc.internal", "AAAA")):
            await dns.asyncquery.udp(dns.message.make_query(name, rdtype), host, port=port, timeout=2)
        await dns.asyncquery.tcp(dns.message.make_query("web.svc.internal", "TYPE999"), host, port=port, timeout=2)
        samples = scrape(registry)

    def queries(service: str, qtype: str, rcode: str, transport: str) -> float:
        labels = (("qtype", qtype), ("rcode", rcode), ("service", service), ("transport", transport))
        return samples.get(("pointsman_dns_queries_total", labels), 0.0)

    assert queries("web", "A", "NOERROR", "udp") == 2
    # A name no service has: no service label value made up from what the client asked.
    assert queries("", "AAAA", "NXDOMAIN", "udp") == 1
    assert queries("web", "other", "NOERROR", "tcp") == 1  # unknown types share one label value
    assert samples[("pointsman_dns_query_duration_seconds_count", ())] == 4
    assert samples[("pointsman_dns_query_duration_seconds_bucket", (("le", "+Inf"),))] == 4
    assert 0 < samples[("pointsman_dns_query_duration_seconds_sum", ())] < 1
    assert samples[("pointsman_dns_cache_builds_total", ())] == 3
    assert samples[("pointsman_dns_cache_entries", ())] == 3
    assert ("pointsman_dns_tcp_connections", ()) in samples
