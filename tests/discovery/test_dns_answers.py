"""Answers from the catalog, asked by a real client (dnspython) over real UDP and TCP sockets."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.asyncresolver
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.reversename
import pytest

from discovery.dns import DnsServer
from discovery.model import Snapshot
from tests.discovery.conftest import instance, running_dns, snapshot

TRANSPORTS = ["udp", "tcp"]


def catalog() -> Snapshot:
    return snapshot(
        instance("web-1", "web", "10.0.0.1", ports={"http": 8080}, tags=("blue",)),
        instance("web-2", "web", "10.0.0.2", ports={"http": 8081}, tags=("green",)),
        instance("web-3", "web", "10.0.0.3", ports={"http": 8082}, tags=("blue",)),
        instance("web-6", "web", "fd00::6", ports={"http": 8086}, tags=("green",)),
        instance("web-9", "web", "10.0.0.9", health="critical", tags=("blue",)),
        instance(
            "db-1",
            "db",
            "127.0.0.1",
            ports={"postgres": 5432},
            tags=("primary",),
            meta={"zone": "a", "version": "16"},
            weight=3,
        ),
        instance("db-2", "db", "127.0.0.2", ports={"postgres": 5433}, tags=("replica",)),
        instance("c-1", "cache", "10.1.0.1", health="warning"),
        instance("c-2", "cache", "10.1.0.2", health="critical"),
        instance("q-1", "queue", "10.2.0.1", health="critical"),
        empty=("idle",),
    )


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    async with running_dns(catalog(), ttl="7s", negative_ttl="3s") as (server, _):
        yield server


async def ask(
    server: DnsServer, name: str, rdtype: str = "A", transport: str = "udp", **kwargs: object
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    host, port = server.address
    if transport == "udp":
        return await dns.asyncquery.udp(query, host, port=port, timeout=2)
    return await dns.asyncquery.tcp(query, host, port=port, timeout=2)


def addresses(response: dns.message.Message) -> list[str]:
    return [rr.to_text() for rrset in response.answer for rr in rrset if rrset.rdtype in (1, 28)]


def assert_negative(response: dns.message.Message, rcode: int, domain: str = "internal.", ttl: int = 3) -> None:
    """NXDOMAIN or NODATA as RFC 2308 wants it: no answer, the zone's SOA in authority with
    the negative TTL (which is also the SOA's MINIMUM)."""
    assert response.rcode() == rcode
    assert response.answer == []
    assert len(response.authority) == 1
    soa = response.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == dns.name.from_text(domain)
    assert soa.ttl == ttl
    assert soa[0].minimum == ttl


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_service_a_lists_the_passing_instances(server: DnsServer, transport: str) -> None:
    response = await ask(server, "web.svc.internal", "A", transport)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert sorted(addresses(response)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]  # web-9 is critical
    assert response.answer[0].ttl == 7


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_service_aaaa(server: DnsServer, transport: str) -> None:
    response = await ask(server, "web.svc.internal", "AAAA", transport)
    assert addresses(response) == ["fd00::6"]


async def test_answers_rotate_round_robin(server: DnsServer) -> None:
    firsts: Counter[str] = Counter()
    orders = set()
    for _ in range(30):
        response = await ask(server, "web.svc.internal")
        order = tuple(addresses(response))
        orders.add(order)
        firsts[order[0]] += 1
    # Every instance leads in turn: 30 answers, 3 instances, 10 times each.
    assert firsts == {"10.0.0.1": 10, "10.0.0.2": 10, "10.0.0.3": 10}
    assert all(sorted(order) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] for order in orders)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_tag_filters_instances(server: DnsServer, transport: str) -> None:
    blue = await ask(server, "blue.web.svc.internal", "A", transport)
    assert sorted(addresses(blue)) == ["10.0.0.1", "10.0.0.3"]
    primary = await ask(server, "primary.db.svc.internal", "A", transport)
    assert addresses(primary) == ["127.0.0.1"]
    green6 = await ask(server, "green.web.svc.internal", "AAAA", transport)
    assert addresses(green6) == ["fd00::6"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_instance_name_answers_one_instance(server: DnsServer, transport: str) -> None:
    response = await ask(server, "db-1.db.svc.internal", "A", transport)
    assert addresses(response) == ["127.0.0.1"]
    # An instance's own name answers whatever its health: it is where that instance is.
    critical = await ask(server, "web-9.web.svc.internal", "A", transport)
    assert addresses(critical) == ["10.0.0.9"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_srv_with_targets_in_additional(server: DnsServer, transport: str) -> None:
    response = await ask(server, "_postgres._tcp.db.svc.internal", "SRV", transport)
    assert response.rcode() == dns.rcode.NOERROR
    records = sorted((rr.port, rr.weight, rr.priority, rr.target.to_text()) for rr in response.answer[0])
    assert records == [(5432, 3, 0, "db-1.db.svc.internal."), (5433, 1, 0, "db-2.db.svc.internal.")]
    glue = {rrset.name.to_text(): [rr.to_text() for rr in rrset] for rrset in response.additional}
    assert glue == {"db-1.db.svc.internal.": ["127.0.0.1"], "db-2.db.svc.internal.": ["127.0.0.2"]}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_srv_udp_protocol_label_and_mixed_families(server: DnsServer, transport: str) -> None:
    response = await ask(server, "_http._udp.web.svc.internal", "SRV", transport)
    targets = sorted(rr.target.to_text() for rr in response.answer[0])
    assert targets == [f"web-{n}.web.svc.internal." for n in (1, 2, 3, 6)]
    glue = {(rrset.name.to_text(), rrset.rdtype) for rrset in response.additional}
    assert ("web-6.web.svc.internal.", dns.rdatatype.AAAA) in glue
    assert ("web-1.web.svc.internal.", dns.rdatatype.A) in glue


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_txt_is_the_instance_meta(server: DnsServer, transport: str) -> None:
    response = await ask(server, "db-1.db.svc.internal", "TXT", transport)
    strings = [s for rr in response.answer[0] for s in rr.strings]
    assert strings == [b"version=16", b"zone=a"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_txt_without_meta_is_nodata(server: DnsServer, transport: str) -> None:
    assert_negative(await ask(server, "db-2.db.svc.internal", "TXT", transport), dns.rcode.NOERROR)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ptr_for_instance_addresses(server: DnsServer, transport: str) -> None:
    v4 = await ask(server, dns.reversename.from_address("127.0.0.2").to_text(), "PTR", transport)
    assert [rr.to_text() for rr in v4.answer[0]] == ["db-2.db.svc.internal."]
    v6 = await ask(server, dns.reversename.from_address("fd00::6").to_text(), "PTR", transport)
    assert [rr.to_text() for rr in v6.answer[0]] == ["web-6.web.svc.internal."]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_nxdomain_for_names_that_do_not_exist(server: DnsServer, transport: str) -> None:
    for name in (
        "nope.svc.internal",  # no such service
        "nope.web.svc.internal",  # neither an instance nor a tag
        "a.b.web.svc.internal",
        "_nope._tcp.web.svc.internal",  # no instance has that port
        "_http._sctp.web.svc.internal",
        "other.internal",  # nothing in the zone but svc and ns
        "_tcp.cache.svc.internal",  # no instance of cache has a port
    ):
        assert_negative(await ask(server, name, "A", transport), dns.rcode.NXDOMAIN)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_nodata_for_existing_names_without_that_type(server: DnsServer, transport: str) -> None:
    cases = [
        ("web.svc.internal", "MX"),
        ("web.svc.internal", "SRV"),  # SRV lives at _<port>._tcp.web
        ("_http._tcp.web.svc.internal", "A"),
        ("db-1.db.svc.internal", "AAAA"),  # an IPv4 instance
        ("svc.internal", "A"),  # an empty non-terminal, not NXDOMAIN (RFC 8020)
        ("_tcp.web.svc.internal", "SRV"),
        ("idle.svc.internal", "A"),  # a service with no instances still exists
        ("queue.svc.internal", "A"),  # only a critical instance: nothing usable
        ("internal", "A"),
    ]
    for name, rdtype in cases:
        assert_negative(await ask(server, name, rdtype, transport), dns.rcode.NOERROR)


async def test_warning_instances_when_none_pass(server: DnsServer) -> None:
    response = await ask(server, "cache.svc.internal")
    assert addresses(response) == ["10.1.0.1"]  # c-1 warns, c-2 is critical


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_apex_soa_and_ns(server: DnsServer, transport: str) -> None:
    soa = await ask(server, "internal", "SOA", transport)
    assert soa.rcode() == dns.rcode.NOERROR
    record = soa.answer[0][0]
    assert record.mname.to_text() == "ns.internal."
    assert record.rname.to_text() == "hostmaster.internal."
    assert record.minimum == 3
    ns = await ask(server, "internal", "NS", transport)
    assert [rr.to_text() for rr in ns.answer[0]] == ["ns.internal."]
    # The server listens on 127.0.0.1, so ns.internal has that address (as glue and by name).
    assert [(r.name.to_text(), r[0].to_text()) for r in ns.additional] == [("ns.internal.", "127.0.0.1")]
    assert addresses(await ask(server, "ns.internal", "A", transport)) == ["127.0.0.1"]


async def test_any_gives_the_addresses(server: DnsServer) -> None:
    response = await ask(server, "db-1.db.svc.internal", "ANY", "tcp")
    types = sorted(dns.rdatatype.to_text(rrset.rdtype) for rrset in response.answer)
    assert types == ["A", "TXT"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_names_are_case_insensitive_and_the_question_case_is_kept(server: DnsServer, transport: str) -> None:
    # Resolvers that randomise case (DNS 0x20) check that the answer repeats their spelling.
    response = await ask(server, "WeB.sVc.InTeRnAl", "A", transport)
    assert response.question[0].name.to_text() == "WeB.sVc.InTeRnAl."
    assert response.answer[0].name.to_text() == "WeB.sVc.InTeRnAl."
    assert sorted(addresses(response)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    # The same name in lower case right after is served from the same cache entry, lower case.
    lower = await ask(server, "web.svc.internal", "A", transport)
    assert lower.question[0].name.to_text() == "web.svc.internal."


async def test_trailing_dot_domain_and_custom_domain() -> None:
    snap = snapshot(instance("a-1", "api", "10.9.0.1"))
    async with running_dns(snap, domain="Corp.Example.") as (server, _):
        response = await ask(server, "api.svc.corp.example")
        assert addresses(response) == ["10.9.0.1"]
        refused = await ask(server, "api.svc.internal")  # outside the zone, no upstreams
        assert refused.rcode() == dns.rcode.REFUSED


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_edns_is_echoed_and_do_bit_copied(server: DnsServer, transport: str) -> None:
    plain = await ask(server, "web.svc.internal", "A", transport)
    assert plain.edns == -1  # no OPT in the query: none in the answer
    edns = await ask(server, "web.svc.internal", "A", transport, use_edns=0, payload=4096)
    assert edns.edns == 0
    assert edns.payload == 1232  # what we accept and send at most over UDP
    assert not edns.ednsflags & dns.flags.DO
    do = await ask(server, "web.svc.internal", "A", transport, use_edns=0, want_dnssec=True)
    assert do.ednsflags & dns.flags.DO


async def test_rd_flag_is_echoed(server: DnsServer) -> None:
    with_rd = await ask(server, "web.svc.internal")
    assert with_rd.flags & dns.flags.RD
    query = dns.message.make_query("web.svc.internal", "A")
    query.flags &= ~dns.flags.RD
    host, port = server.address
    without = await dns.asyncquery.udp(query, host, port=port, timeout=2)
    assert not without.flags & dns.flags.RD
    assert sorted(addresses(without)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


@pytest.mark.parametrize("tcp", [False, True])
async def test_dnspython_resolver_pointed_at_the_server(server: DnsServer, tcp: bool) -> None:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server.address[0]]
    resolver.port = server.address[1]
    resolver.lifetime = 3
    answer = await resolver.resolve("web.svc.internal", "A", tcp=tcp)
    assert sorted(rr.to_text() for rr in answer) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    srv = await resolver.resolve("_postgres._tcp.db.svc.internal", "SRV", tcp=tcp)
    assert len(srv) == 2
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nope.svc.internal", "A", tcp=tcp)
    with pytest.raises(dns.resolver.NoAnswer):
        await resolver.resolve("web.svc.internal", "MX", tcp=tcp)
    ptr = await resolver.resolve_address("127.0.0.1")
    assert [rr.to_text() for rr in ptr] == ["db-1.db.svc.internal."]


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dual_stack_listen_address(transport: str) -> None:
    """``[::]:0`` takes IPv4 and IPv6 clients over both transports; an IPv4 client arrives as
    ::ffff:127.0.0.1 and is checked against ``allow`` as 127.0.0.1."""
    async with running_dns(catalog(), listen="[::]:0", allow=["127.0.0.0/8", "::1/128"]) as (server, _):
        port = server.address[1]
        assert server.tcp_address[1] == port
        call = dns.asyncquery.udp if transport == "udp" else dns.asyncquery.tcp
        for host in ("127.0.0.1", "::1"):
            response = await call(dns.message.make_query("db-1.db.svc.internal", "A"), host, port=port, timeout=2)
            assert response.rcode() == dns.rcode.NOERROR, host
            assert addresses(response) == ["127.0.0.1"]
    async with running_dns(catalog(), listen="[::]:0", allow=["::1/128"]) as (server, _):
        call = dns.asyncquery.udp if transport == "udp" else dns.asyncquery.tcp
        query = dns.message.make_query("web.svc.internal", "A")
        response = await call(query, "127.0.0.1", port=server.address[1], timeout=2)
        assert response.rcode() == dns.rcode.REFUSED
