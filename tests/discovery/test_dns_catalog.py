"""Catalog changes reach the answers at once, and only the changed services' answers are rebuilt."""

from __future__ import annotations

import asyncio
import time

import dns.asyncquery
import dns.message
import dns.rcode
import dns.reversename

from discovery.config import DnsConfig
from discovery.dns import DnsServer
from discovery.dns_cache import DnsAnswerCache
from discovery.dns_wire import MODE_BYTES, name_wire
from discovery.dns_zone import DnsResolver
from tests.discovery.conftest import instance, running_dns, snapshot


async def ask(server: DnsServer, name: str, rdtype: str = "A") -> dns.message.Message:
    host, port = server.address
    return await dns.asyncquery.udp(dns.message.make_query(name, rdtype), host, port=port, timeout=2)


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(rr.to_text() for rrset in response.answer for rr in rrset)


async def test_answer_changes_within_100ms_of_publish() -> None:
    """A client querying in a loop sees the new instance within 100 ms of ``publish``."""
    one = snapshot(instance("web-1", "web", "10.0.0.1"), revision=1)
    two = snapshot(instance("web-1", "web", "10.0.0.1"), instance("web-2", "web", "10.0.0.2"), revision=2)
    async with running_dns(one) as (server, catalog):
        assert addresses(await ask(server, "web.svc.internal")) == ["10.0.0.1"]
        published = asyncio.Event()
        seen_at: list[float] = []

        async def poll() -> None:
            while True:
                answer = addresses(await ask(server, "web.svc.internal"))
                if published.is_set() and answer == ["10.0.0.1", "10.0.0.2"]:
                    seen_at.append(time.perf_counter())
                    return

        poller = asyncio.create_task(poll())
        await asyncio.sleep(0.05)  # the poller is getting cached answers for the old snapshot
        started = time.perf_counter()
        catalog.publish(two)
        published.set()
        await asyncio.wait_for(poller, 2)
        assert seen_at[0] - started < 0.1


async def test_only_the_changed_services_are_rebuilt() -> None:
    web = instance("web-1", "web", "10.0.0.1")
    db = instance("db-1", "db", "10.0.1.1")
    async with running_dns(snapshot(web, db)) as (server, catalog):
        assert server.cache is not None
        for name in ("web.svc.internal", "db.svc.internal", "nope.svc.internal", "internal"):
            await ask(server, name)
        builds = server.cache.builds
        catalog.publish(snapshot(web, instance("db-1", "db", "10.0.1.9"), revision=2))
        assert addresses(await ask(server, "db.svc.internal")) == ["10.0.1.9"]
        assert server.cache.builds == builds + 1  # db rebuilt...
        for name in ("web.svc.internal", "nope.svc.internal", "internal"):
            await ask(server, name)
        assert server.cache.builds == builds + 1  # ...web, the NXDOMAIN and the apex were not


async def test_health_additions_and_removals_show_up() -> None:
    web1 = instance("web-1", "web", "10.0.0.1")
    web2 = instance("web-2", "web", "10.0.0.2")
    async with running_dns(snapshot(web1, web2)) as (server, catalog):
        assert addresses(await ask(server, "web.svc.internal")) == ["10.0.0.1", "10.0.0.2"]
        assert (await ask(server, "api.svc.internal")).rcode() == dns.rcode.NXDOMAIN
        failing = instance("web-2", "web", "10.0.0.2", health="critical")
        catalog.publish(snapshot(web1, failing, instance("api-1", "api", "10.5.0.1"), revision=2))
        assert addresses(await ask(server, "web.svc.internal")) == ["10.0.0.1"]
        assert addresses(await ask(server, "api.svc.internal")) == ["10.5.0.1"]  # the cached NXDOMAIN went
        catalog.publish(snapshot(web1, revision=3))
        assert (await ask(server, "api.svc.internal")).rcode() == dns.rcode.NXDOMAIN
        assert (await ask(server, "web-2.web.svc.internal")).rcode() == dns.rcode.NXDOMAIN


async def test_reverse_answers_follow_any_change() -> None:
    async with running_dns(snapshot(instance("web-1", "web", "10.0.0.1"))) as (server, catalog):
        name = dns.reversename.from_address("10.0.0.1").to_text()
        assert addresses(await ask(server, name, "PTR")) == ["web-1.web.svc.internal."]
        catalog.publish(snapshot(instance("api-1", "api", "10.0.0.1"), revision=2))
        assert addresses(await ask(server, name, "PTR")) == ["api-1.api.svc.internal."]


def test_the_cache_is_bounded_first_in_first_out() -> None:
    config = DnsConfig.model_validate({"listen": "127.0.0.1:0", "upstreams": []})
    resolver = DnsResolver(config, forwarding=False)
    resolver.use(snapshot(*(instance(f"i-{n}", f"s{n}", f"10.0.0.{n + 1}") for n in range(5))))
    cache = DnsAnswerCache(resolver, ra=False, max_entries=3)
    keys = []
    for n in range(5):
        wire = name_wire((f"s{n}".encode(), b"svc", b"internal"))
        key = wire + b"\x00\x01\x00\x01" + MODE_BYTES[0]
        assert cache.build(key, wire, 1, 1, 0) is not None
        keys.append(key)
    assert list(cache.entries) == keys[2:]
    assert sum(len(v) for v in cache._by_tag.values()) == 3  # the index forgot the evicted ones
    assert cache.update(snapshot(instance("i-4", "s4", "10.9.9.9"), revision=2)) >= {"s4"}
    assert keys[4] not in cache.entries
