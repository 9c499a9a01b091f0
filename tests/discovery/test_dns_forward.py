"""Names outside the domain go upstream. The upstream here is a second DnsServer (serving the
domain ``upstream.test``) on its own ephemeral port: a real DNS server over real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.reversename
import pytest

from discovery.config import format_address
from discovery.dns import DnsServer
from discovery.dns_forward import resolve_upstreams, system_nameservers
from tests.discovery.conftest import dig, instance, running_dns, snapshot

TRANSPORTS = ["udp", "tcp"]


@pytest.fixture
async def upstream() -> AsyncIterator[DnsServer]:
    items = [instance("api-1", "api", "10.50.0.1"), instance("ext-1", "ext", "10.77.0.1")]
    items += [instance(f"b-{n:03}", "big", f"10.60.0.{n + 1}") for n in range(100)]
    async with running_dns(snapshot(*items), domain="upstream.test") as (server, _):
        yield server


@pytest.fixture
async def server(upstream: DnsServer) -> AsyncIterator[DnsServer]:
    snap = snapshot(instance("web-1", "web", "10.0.0.1"))
    async with running_dns(snap, upstreams=[format_address(upstream.address)]) as (server, _):
        yield server


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A UDP port with nothing bound: datagrams to it come back as ICMP port unreachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port


async def ask(server: DnsServer, name: str, rdtype: str = "A", transport: str = "udp") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    host, port = server.address
    call = dns.asyncquery.udp if transport == "udp" else dns.asyncquery.tcp
    return await call(query, host, port=port, timeout=5)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_outside_names_are_forwarded(server: DnsServer, upstream: DnsServer, transport: str) -> None:
    response = await ask(server, "api.svc.upstream.test", "A", transport)
    assert response.rcode() == dns.rcode.NOERROR
    assert [rr.to_text() for rr in response.answer[0]] == ["10.50.0.1"]
    assert response.flags & dns.flags.RA
    # The upstream's negative answer comes back as it is, SOA and all.
    missing = await ask(server, "nope.svc.upstream.test", "A", transport)
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert missing.authority[0].name.to_text() == "upstream.test."
    # Our own names are still ours.
    assert [rr.to_text() for rr in (await ask(server, "web.svc.internal", "A", transport)).answer[0]] == ["10.0.0.1"]
    assert server.collector.forwarded.get(("ok",)) == 2
    assert upstream.collector.queries.get(("api", "A", "NOERROR", "udp")) == 1


async def test_ptr_for_other_addresses_is_forwarded(server: DnsServer) -> None:
    # 10.77.0.1 is not an instance here but is one upstream: the reverse name goes up.
    response = await ask(server, dns.reversename.from_address("10.77.0.1").to_text(), "PTR")
    assert [rr.to_text() for rr in response.answer[0]] == ["ext-1.ext.svc.upstream.test."]
    ours = await ask(server, dns.reversename.from_address("10.0.0.1").to_text(), "PTR")
    assert [rr.to_text() for rr in ours.answer[0]] == ["web-1.web.svc.internal."]


async def test_truncated_upstream_answers_are_fetched_over_tcp(server: DnsServer) -> None:
    host, port = server.address
    query = dns.message.make_query("big.svc.upstream.test", "A")
    # Over UDP the client gets TC (100 records do not fit 512 bytes)...
    udp = await dns.asyncquery.udp(query, host, port=port, timeout=5)
    assert udp.flags & dns.flags.TC
    # ...and over TCP the whole answer, which we fetched from upstream over TCP after its TC.
    response, used_tcp = await dns.asyncquery.udp_with_fallback(query, host, port=port, timeout=5)
    assert used_tcp
    assert len(response.answer[0]) == 100
    assert server.collector.forwarded.get(("tcp_retry",)) >= 2


async def test_servfail_when_the_upstream_port_is_dead(dead_port: int) -> None:
    async with running_dns(upstreams=[f"127.0.0.1:{dead_port}"], upstream_timeout="2s") as (server, _):
        for transport in TRANSPORTS:
            loop = asyncio.get_running_loop()
            started = loop.time()
            response = await ask(server, "example.com", "A", transport)
            assert response.rcode() == dns.rcode.SERVFAIL
            assert response.question[0].name.to_text() == "example.com."
            # ICMP port unreachable ends the try at once; no waiting for the timeout.
            assert loop.time() - started < 1.0
        assert server.collector.forwarded.get(("error",)) == 2
        assert server.collector.queries.get(("", "A", "SERVFAIL", "tcp")) == 1


async def test_servfail_after_the_timeout_when_the_upstream_is_silent() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never read: no answer, no ICMP
        upstream = f"127.0.0.1:{silent.getsockname()[1]}"
        async with running_dns(upstreams=[upstream], upstream_timeout="200ms") as (server, _):
            loop = asyncio.get_running_loop()
            started = loop.time()
            response = await ask(server, "example.com")
            elapsed = loop.time() - started
            assert response.rcode() == dns.rcode.SERVFAIL
            assert 0.15 < elapsed < 1.5
            assert server.collector.forwarded.get(("timeout",)) == 1


async def test_the_next_upstream_is_tried(upstream: DnsServer, dead_port: int) -> None:
    upstreams = [f"127.0.0.1:{dead_port}", format_address(upstream.address)]
    async with running_dns(upstreams=upstreams) as (server, _):
        response = await ask(server, "api.svc.upstream.test")
        assert [rr.to_text() for rr in response.answer[0]] == ["10.50.0.1"]


async def test_overload_fails_fast(server: DnsServer) -> None:
    assert server._forwarder is not None
    server._forwarder.max_inflight = 0
    response = await ask(server, "api.svc.upstream.test")
    assert response.rcode() == dns.rcode.SERVFAIL
    assert server.collector.forwarded.get(("overload",)) == 1


async def test_dig_through_the_forwarder(server: DnsServer) -> None:
    for extra in ((), ("+tcp",)):
        out = await dig(server, *extra, "api.svc.upstream.test", "A")
        assert "status: NOERROR" in out
        assert "10.50.0.1" in out


def test_system_upstreams_come_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\nsearch example\nnameserver 192.0.2.53\nnameserver 2001:db8::53 # v6\n"
        "nameserver not-an-ip\noptions ndots:2\n"
    )
    assert system_nameservers(conf) == [("192.0.2.53", 53), ("2001:db8::53", 53)]
    assert resolve_upstreams(["10.0.0.2:5353", "system", "[::1]:53", "10.0.0.2:5353"], conf) == [
        ("10.0.0.2", 5353),
        ("192.0.2.53", 53),
        ("2001:db8::53", 53),
        ("::1", 53),
    ]
    assert system_nameservers(tmp_path / "missing") == []


async def test_the_server_never_forwards_to_itself() -> None:
    async with running_dns() as (server, _):
        host, port = server.address
        kept = server._usable_upstreams(
            [(host, port), ("127.0.0.1", port + 1 if port < 65535 else 1), ("10.0.0.1", port)]
        )
        assert (host, port) not in kept
        assert len(kept) == 2
