"""Whatever arrives, the server keeps answering: random bytes and mutated valid queries over UDP
and TCP must never raise inside the server (its loop's exception handler sees nothing) and a
valid query sent right after each one is answered correctly.

The server runs on its own event loop in a thread (hypothesis drives synchronous tests)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import dns.message
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discovery.dns import DnsServer
from discovery.dns_cache import DnsAnswerCache
from discovery.dns_metrics import DnsStats
from discovery.dns_responder import UDP, DnsResponder
from discovery.dns_wire import scan_query
from discovery.dns_zone import DnsResolver
from discovery.model import Snapshot
from tests.discovery.conftest import dns_config, instance, snapshot, threaded_dns

SEEDS = [
    dns.message.make_query("web.svc.internal", "A").to_wire(),
    dns.message.make_query("web.svc.internal", "AAAA", use_edns=0, payload=1232).to_wire(),
    dns.message.make_query("_http._tcp.web.svc.internal", "SRV", want_dnssec=True).to_wire(),
    dns.message.make_query("web-1.web.svc.internal", "TXT").to_wire(),
    dns.message.make_query("1.0.0.10.in-addr.arpa", "PTR").to_wire(),
    dns.message.make_query("internal", "SOA").to_wire(),
    dns.message.make_query("nope.svc.internal", "A").to_wire(),
]
PROBE_ID = 0xBEEF


def catalog() -> Snapshot:
    return snapshot(
        *(
            instance(f"web-{n}", "web", f"10.0.0.{n}", ports={"http": 8000 + n}, meta={"n": str(n)})
            for n in range(1, 40)
        )
    )


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[DnsServer, list[dict[str, object]]]]:
    with threaded_dns(catalog(), tcp_idle_timeout="5s") as running:
        yield running


def probe() -> bytes:
    return dns.message.make_query("web.svc.internal", "A", id=PROBE_ID, use_edns=0, payload=1232).to_wire()


def check_alive(sock: socket.socket) -> None:
    """The probe gets its right answer (answers to the fuzz input may arrive first: skip them)."""
    sock.send(probe())
    while True:
        answer = sock.recv(65535)
        if answer[:2] == struct.pack("!H", PROBE_ID) and answer[2] & 0x80:
            break
    response = dns.message.from_wire(answer)
    assert response.rcode() == dns.rcode.NOERROR
    assert len(response.answer[0]) == 39


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if action == "cut":
            wire = wire[: draw(st.integers(0, len(wire)))]
        elif action == "insert":
            at = draw(st.integers(0, len(wire)))
            wire[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif not wire:
            continue
        elif action == "flip":
            at = draw(st.integers(0, len(wire) - 1))
            wire[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            wire[draw(st.integers(0, len(wire) - 1))] = draw(st.integers(0, 255))
        else:
            at = draw(st.integers(0, len(wire) - 1))
            del wire[at : at + draw(st.integers(1, 4))]
    return bytes(wire)


payloads = st.one_of(
    st.binary(max_size=600),
    mutated(),
    # a valid header (QR clear, opcode QUERY, one question) followed by junk
    st.binary(max_size=300).map(lambda junk: struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + junk),
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(payload=payloads)
def test_udp_fuzz(server: tuple[DnsServer, list[dict[str, object]]], payload: bytes) -> None:
    dns_server, errors = server
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect(dns_server.address)
        sock.send(payload)
        check_alive(sock)
    assert errors == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads)
def test_tcp_fuzz(server: tuple[DnsServer, list[dict[str, object]]], payload: bytes) -> None:
    dns_server, errors = server
    with socket.create_connection(dns_server.tcp_address, timeout=2) as sock:
        # A frame with the fuzz input; if the server keeps the connection (a frame of 12 bytes
        # or more is always answered or dropped, never fatal), the probe follows on it.
        sock.sendall(struct.pack("!H", len(payload)) + payload)
        if len(payload) >= 12:
            message = probe()
            sock.sendall(struct.pack("!H", len(message)) + message)
            while True:
                head = _recv_exactly(sock, 2)
                body = _recv_exactly(sock, struct.unpack("!H", head)[0])
                if body[:2] == struct.pack("!H", PROBE_ID) and body[2] & 0x80:
                    break
            assert dns.message.from_wire(body).rcode() == dns.rcode.NOERROR
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(2)
        udp.connect(dns_server.address)
        check_alive(udp)
    assert errors == []


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


@settings(max_examples=1000, deadline=None)
@given(payload=payloads)
def test_responder_answers_or_drops_and_the_scanner_agrees_with_dnspython(payload: bytes) -> None:
    """Sans-IO: the responder never raises; whatever the scanner takes on the hot path is a
    message dnspython parses to the same question."""
    # The scanner's precondition, checked by the responder first: a header, QR clear, QUERY.
    scanned = scan_query(payload) if len(payload) >= 12 and not payload[2] & 0xF8 else None
    if scanned is not None:
        parsed = dns.message.from_wire(payload, ignore_trailing=False)
        nend = scanned[0]
        assert parsed.question[0].name.to_wire() == payload[12:nend]
    responder = _responder()
    reply = responder.respond(payload, True, UDP)
    if isinstance(reply, bytes):
        assert reply[:2] == payload[:2]
        assert reply[2] & 0x80
        assert len(reply) <= 1232


_RESPONDER: list[DnsResponder] = []


def _responder() -> DnsResponder:
    """One responder over the fuzz catalog, built on first use (no sockets)."""
    if not _RESPONDER:
        resolver = DnsResolver(dns_config(), forwarding=True)
        resolver.use(catalog())
        _RESPONDER.append(DnsResponder(DnsAnswerCache(resolver, ra=True), DnsStats()))
    return _RESPONDER[0]
