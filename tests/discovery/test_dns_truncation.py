"""Answers too big for UDP: TC set over UDP, the whole answer over TCP; the TCP server itself."""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import pytest

from discovery.dns import DnsServer
from tests.discovery.conftest import dig, instance, running_dns, snapshot

MANY = 60  # 60 A records: ~16 bytes each compressed, ~990 bytes: over 512, under 1232


def big_catalog() -> list:
    items = [
        instance(f"w-{n:03}", "web", f"10.0.{n // 250}.{n % 250 + 1}", ports={"http": 8000 + n}) for n in range(MANY)
    ]
    items += [instance(f"h-{n:03}", "huge", f"10.9.{n // 250}.{n % 250 + 1}") for n in range(300)]
    items.append(instance("s-1", "small", "10.8.0.1"))
    return items


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    async with running_dns(snapshot(*big_catalog()), tcp_idle_timeout="300ms") as (server, _):
        yield server


async def test_udp_without_edns_is_truncated_then_tcp_has_it_all(server: DnsServer) -> None:
    host, port = server.address
    query = dns.message.make_query("web.svc.internal", "A")
    udp = await dns.asyncquery.udp(query, host, port=port, timeout=2)
    assert udp.flags & dns.flags.TC
    assert udp.answer == []
    assert len(udp.to_wire()) <= 512
    tcp = await dns.asyncquery.tcp(query, host, port=port, timeout=2)
    assert not tcp.flags & dns.flags.TC
    assert len(tcp.answer[0]) == MANY
    # What a stub resolver does: UDP, then TCP on TC.
    response, used_tcp = await dns.asyncquery.udp_with_fallback(query, host, port=port, timeout=2)
    assert used_tcp
    assert len(response.answer[0]) == MANY


async def test_edns_payload_size_is_honoured(server: DnsServer) -> None:
    host, port = server.address
    # 1232 fits the 60 records.
    big = await dns.asyncquery.udp(
        dns.message.make_query("web.svc.internal", "A", use_edns=0, payload=1232), host, port=port, timeout=2
    )
    assert not big.flags & dns.flags.TC
    assert len(big.answer[0]) == MANY
    # A client offering 600 bytes gets TC, with the OPT record still there.
    small = await dns.asyncquery.udp(
        dns.message.make_query("web.svc.internal", "A", use_edns=0, payload=600), host, port=port, timeout=2
    )
    assert small.flags & dns.flags.TC
    assert small.edns == 0
    # Offers above 1232 are held to 1232 (no IP fragmentation): 300 records never fit.
    huge = await dns.asyncquery.udp(
        dns.message.make_query("huge.svc.internal", "A", use_edns=0, payload=65000), host, port=port, timeout=2
    )
    assert huge.flags & dns.flags.TC
    assert len(huge.to_wire()) <= 1232
    whole = await dns.asyncquery.tcp(dns.message.make_query("huge.svc.internal", "A"), host, port=port, timeout=2)
    assert len(whole.answer[0]) == 300


async def test_srv_drops_the_additional_section_before_truncating(server: DnsServer) -> None:
    host, port = server.address
    query = dns.message.make_query("_http._tcp.web.svc.internal", "SRV", use_edns=0, payload=1232)
    # 60 SRV records are too big even alone for 1232: TC.
    udp = await dns.asyncquery.udp(query, host, port=port, timeout=2)
    assert udp.flags & dns.flags.TC
    tcp = await dns.asyncquery.tcp(query, host, port=port, timeout=2)
    assert len(tcp.answer[0]) == MANY
    assert len(tcp.additional) == MANY  # glue for every target over TCP


async def test_srv_glue_omitted_without_tc_when_the_answer_alone_fits() -> None:
    # 10 SRV records + glue are over 512 bytes, the records alone are not (SRV targets are never
    # compressed, RFC 2782: ~41 bytes a record): RFC 2181 9 lets the
    # additional section go without setting TC.
    items = [instance(f"i-{n:02}", "api", f"10.3.0.{n + 1}", ports={"grpc": 9000 + n}) for n in range(10)]
    async with running_dns(snapshot(*items)) as (server, _):
        host, port = server.address
        query = dns.message.make_query("_grpc._tcp.api.svc.internal", "SRV")
        udp = await dns.asyncquery.udp(query, host, port=port, timeout=2)
        assert not udp.flags & dns.flags.TC
        assert len(udp.answer[0]) == 10
        assert udp.additional == []
        assert len(udp.to_wire()) <= 512
        tcp = await dns.asyncquery.tcp(query, host, port=port, timeout=2)
        assert len(tcp.additional) == 10


async def test_dig_retries_over_tcp_on_tc(server: DnsServer) -> None:
    out = await dig(server, "+noedns", "+notcp", "web.svc.internal", "A")
    assert "Truncated, retrying in TCP mode" in out
    assert "status: NOERROR" in out
    assert f"ANSWER: {MANY}," in out
    ignored = await dig(server, "+noedns", "+ignore", "web.svc.internal", "A")
    assert re.search(r"flags:[^;]*\btc\b", ignored), ignored
    assert "ANSWER: 0," in ignored


async def tcp_frames(reader: asyncio.StreamReader, count: int) -> list[dns.message.Message]:
    out = []
    for _ in range(count):
        size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 2))[0]
        out.append(dns.message.from_wire(await reader.readexactly(size)))
    return out


async def test_several_pipelined_queries_on_one_connection(server: DnsServer) -> None:
    host, port = server.address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        names = ["small.svc.internal", "web.svc.internal", "nope.svc.internal", "w-001.web.svc.internal"]
        payload = b""
        for n, name in enumerate(names):
            wire = dns.message.make_query(name, "A", id=100 + n).to_wire()
            payload += struct.pack("!H", len(wire)) + wire
        # Written in one go, then byte by byte: framing must not care where the segments end.
        writer.write(payload)
        await writer.drain()
        first = await tcp_frames(reader, len(names))
        for byte in payload:
            writer.write(bytes([byte]))
            await writer.drain()
        second = await tcp_frames(reader, len(names))
    finally:
        writer.close()
        await writer.wait_closed()
    for responses in (first, second):
        assert [r.id for r in responses] == [100, 101, 102, 103]
        assert [r.rcode() for r in responses] == [dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.NXDOMAIN, 0]
        assert len(responses[1].answer[0]) == MANY


async def test_idle_tcp_connections_are_closed(server: DnsServer) -> None:
    host, port = server.address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        wire = dns.message.make_query("small.svc.internal", "A").to_wire()
        writer.write(struct.pack("!H", len(wire)) + wire)
        assert len(await tcp_frames(reader, 1)) == 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 3) == b""  # EOF: the server closed it
        assert 0.2 < loop.time() - started < 2.0  # tcp_idle_timeout is 300ms
    finally:
        writer.close()
        await writer.wait_closed()
    assert server.collector.tcp_connections() == 0
