"""Error answers: REFUSED, FORMERR, NOTIMP, BADVERS, and what is dropped without an answer."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import pytest

from discovery.dns import DnsServer
from tests.discovery.conftest import instance, running_dns, snapshot

TRANSPORTS = ["udp", "tcp"]


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    async with running_dns(snapshot(instance("web-1", "web", "10.0.0.1"))) as (server, _):
        yield server


async def exchange(server: DnsServer, payload: bytes, transport: str = "udp", timeout: float = 2.0) -> bytes | None:
    """Send raw bytes; the raw answer, or None when none came within ``timeout``."""
    host, port = server.address
    loop = asyncio.get_running_loop()
    if transport == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, payload)
            try:
                return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
            except TimeoutError:
                return None
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(struct.pack("!H", len(payload)) + payload)
        await writer.drain()
        try:
            size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), timeout))[0]
            return await reader.readexactly(size)
        except (TimeoutError, asyncio.IncompleteReadError):
            return None
    finally:
        writer.close()
        await writer.wait_closed()


def rcode_of(answer: bytes) -> int:
    return answer[3] & 0x0F


async def test_refused_for_clients_outside_allow() -> None:
    async with running_dns(snapshot(instance("web-1", "web", "10.0.0.1")), allow=["10.0.0.0/8"]) as (server, _):
        host, port = server.address
        for transport in TRANSPORTS:
            query = dns.message.make_query("web.svc.internal", "A")
            call = dns.asyncquery.udp if transport == "udp" else dns.asyncquery.tcp
            response = await call(query, host, port=port, timeout=2)
            assert response.rcode() == dns.rcode.REFUSED
            assert response.answer == []
            # Not an open resolver either: outside names are refused too, never forwarded.
            outside = await call(dns.message.make_query("example.com", "A"), host, port=port, timeout=2)
            assert outside.rcode() == dns.rcode.REFUSED
        assert server.collector.forwarded.total() == 0
        assert server.collector.queries.get(("", "A", "REFUSED", "udp")) == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_formerr_for_junk_with_a_valid_header(server: DnsServer, transport: str) -> None:
    header = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    for junk in (b"\x05abc", b"\x03web\x03svc", b"\xff" * 40, b"\x03web\x00\x00"):
        answer = await exchange(server, header + junk, transport)
        assert answer is not None, junk
        assert answer[:2] == b"\x42\x42"  # the client's ID
        assert answer[2] & 0x80  # QR
        assert rcode_of(answer) == dns.rcode.FORMERR


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_formerr_for_question_counts_other_than_one(server: DnsServer, transport: str) -> None:
    none = struct.pack("!HHHHHH", 7, 0x0100, 0, 0, 0, 0)
    answer = await exchange(server, none, transport)
    assert answer is not None and rcode_of(answer) == dns.rcode.FORMERR
    question = b"\x03web\x03svc\x08internal\x00\x00\x01\x00\x01"
    two = struct.pack("!HHHHHH", 8, 0x0100, 2, 0, 0, 0) + question * 2
    answer = await exchange(server, two, transport)
    assert answer is not None and rcode_of(answer) == dns.rcode.FORMERR


async def test_formerr_for_two_opt_records(server: DnsServer) -> None:
    query = dns.message.make_query("web.svc.internal", "A", use_edns=0)
    wire = bytearray(query.to_wire())
    opt = wire[-11:]
    wire[10:12] = b"\x00\x02"
    answer = await exchange(server, bytes(wire + opt))
    assert answer is not None and rcode_of(answer) == dns.rcode.FORMERR


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("opcode", [dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE, dns.opcode.IQUERY])
async def test_notimp_for_other_opcodes(server: DnsServer, transport: str, opcode: dns.opcode.Opcode) -> None:
    query = dns.message.make_query("web.svc.internal", "A")
    query.set_opcode(opcode)
    host, port = server.address
    call = dns.asyncquery.udp if transport == "udp" else dns.asyncquery.tcp
    response = await call(query, host, port=port, timeout=2)
    assert response.rcode() == dns.rcode.NOTIMP
    assert response.opcode() == opcode


async def test_badvers_for_edns_versions_other_than_0(server: DnsServer) -> None:
    query = dns.message.make_query("web.svc.internal", "A", use_edns=1)
    host, port = server.address
    response = await dns.asyncquery.udp(query, host, port=port, timeout=2)
    assert response.rcode() == dns.rcode.BADVERS
    assert response.edns == 0  # the version we do speak


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unusual_but_valid_queries_take_the_slow_path(server: DnsServer, transport: str) -> None:
    # Valid queries that are not the hot path's shape: an additional record that is not OPT,
    # OPT plus another record, trailing bytes. dnslib parses them; they get the usual answer.
    question = b"\x03web\x03svc\x08internal\x00\x00\x01\x00\x01"
    record = b"\x00" + struct.pack("!HHIH", 1, 1, 0, 4) + bytes([192, 0, 2, 1])  # ". A 192.0.2.1"
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    cases = {
        "non-OPT additional": struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 1) + question + record,
        "OPT and another": struct.pack("!HHHHHH", 10, 0x0100, 1, 0, 0, 2) + question + opt + record,
        "trailing bytes": struct.pack("!HHHHHH", 11, 0x0100, 1, 0, 0, 0) + question + b"\x00\x00",
    }
    for what, message in cases.items():
        answer = await exchange(server, message, transport)
        assert answer is not None, what
        parsed = dns.message.from_wire(answer)
        assert parsed.rcode() == dns.rcode.NOERROR, what
        assert parsed.id == message[1], what
        assert parsed.question[0].name.to_text() == "web.svc.internal.", what
        assert [rr.to_text() for rr in parsed.answer[0]] == ["10.0.0.1"], what


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_compression_pointers_in_the_question_are_formerr(server: DnsServer, transport: str) -> None:
    # A pointer must point to a prior occurrence (RFC 1035 4.1.4); in a lone question there is
    # none, so a pointer there is either forward or a loop.
    for pointer in (b"\xc0\x0c", b"\x03web\xc0\x0c", b"\x03web\xc0\x16"):
        message = struct.pack("!HHHHHH", 12, 0x0100, 1, 0, 0, 0) + pointer + b"\x00\x01\x00\x01"
        answer = await exchange(server, message, transport)
        assert answer is not None and rcode_of(answer) == dns.rcode.FORMERR, pointer


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_chaos_class_and_zone_transfers_are_refused(server: DnsServer, transport: str) -> None:
    host, port = server.address
    call = dns.asyncquery.udp if transport == "udp" else dns.asyncquery.tcp
    chaos = dns.message.make_query("version.bind", "TXT", rdclass=dns.rdataclass.CH)
    assert (await call(chaos, host, port=port, timeout=2)).rcode() == dns.rcode.REFUSED
    axfr = dns.message.make_query("internal", "AXFR")
    assert (await call(axfr, host, port=port, timeout=2)).rcode() == dns.rcode.REFUSED


async def test_short_messages_and_responses_are_dropped(server: DnsServer) -> None:
    assert await exchange(server, b"\x00\x01\x02", timeout=0.3) is None
    response = dns.message.make_response(dns.message.make_query("web.svc.internal", "A"))
    assert await exchange(server, response.to_wire(), timeout=0.3) is None
    dropped = server.collector.dropped
    assert dropped.get(("short",)) == 1
    assert dropped.get(("response",)) == 1
    # ...and the server still answers.
    answer = await exchange(server, dns.message.make_query("web.svc.internal", "A").to_wire())
    assert answer is not None and rcode_of(answer) == dns.rcode.NOERROR


async def test_tcp_frame_shorter_than_a_header_closes_the_connection(server: DnsServer) -> None:
    host, port = server.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x00\x03abc")
    assert await asyncio.wait_for(reader.read(), 2) == b""  # closed, nothing sent
    writer.close()
    await writer.wait_closed()
    assert server.collector.dropped.get(("tcp_framing",)) == 1
