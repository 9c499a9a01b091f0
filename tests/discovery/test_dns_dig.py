"""The same answers through ``dig`` (BIND's client: its own encoder, EDNS with a COOKIE option
by default), over UDP and over TCP (``+tcp``)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from discovery.dns import DnsServer
from tests.discovery.conftest import dig, instance, require_dig, running_dns, snapshot

TRANSPORTS = [(), ("+tcp",)]


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    require_dig()
    snap = snapshot(
        instance("web-1", "web", "10.0.0.1", tags=("blue",)),
        instance("web-2", "web", "10.0.0.2"),
        instance("web-6", "web", "fd00::6"),
        instance("db-1", "db", "127.0.0.1", ports={"postgres": 5432}, tags=("primary",), meta={"zone": "a"}),
    )
    async with running_dns(snap, negative_ttl="3s") as (server, _):
        yield server


def status(out: str) -> str:
    m = re.search(r"status: (\w+)", out)
    assert m, out
    return m.group(1)


def section(out: str, name: str) -> list[str]:
    """The records of one section of dig's output, whitespace-normalised."""
    m = re.search(rf";; {name} SECTION:\n(.*?)(?:\n\n|\Z)", out, re.S)
    return [" ".join(line.split()) for line in m.group(1).splitlines()] if m else []


def transport_of(out: str) -> str:
    m = re.search(r";; SERVER: \S+ \((UDP|TCP)\)", out)
    assert m, out
    return m.group(1)


@pytest.mark.parametrize("extra", TRANSPORTS, ids=["udp", "tcp"])
async def test_records(server: DnsServer, extra: tuple[str, ...]) -> None:
    out = await dig(server, *extra, "web.svc.internal", "A")
    assert status(out) == "NOERROR"
    assert transport_of(out) == ("TCP" if extra else "UDP")
    assert sorted(section(out, "ANSWER")) == [
        "web.svc.internal. 5 IN A 10.0.0.1",
        "web.svc.internal. 5 IN A 10.0.0.2",
    ]
    assert " aa" in out.split(";; flags:")[1].split(";")[0]
    assert section(await dig(server, *extra, "web.svc.internal", "AAAA"), "ANSWER") == [
        "web.svc.internal. 5 IN AAAA fd00::6"
    ]
    assert section(await dig(server, *extra, "blue.web.svc.internal"), "ANSWER") == [
        "blue.web.svc.internal. 5 IN A 10.0.0.1"
    ]
    assert section(await dig(server, *extra, "db-1.db.svc.internal"), "ANSWER") == [
        "db-1.db.svc.internal. 5 IN A 127.0.0.1"
    ]
    srv = await dig(server, *extra, "_postgres._tcp.db.svc.internal", "SRV")
    assert section(srv, "ANSWER") == ["_postgres._tcp.db.svc.internal. 5 IN SRV 0 1 5432 db-1.db.svc.internal."]
    assert section(srv, "ADDITIONAL") == ["db-1.db.svc.internal. 5 IN A 127.0.0.1"]
    assert section(await dig(server, *extra, "db-1.db.svc.internal", "TXT"), "ANSWER") == [
        'db-1.db.svc.internal. 5 IN TXT "zone=a"'
    ]
    assert section(await dig(server, *extra, "-x", "127.0.0.1"), "ANSWER") == [
        "1.0.0.127.in-addr.arpa. 5 IN PTR db-1.db.svc.internal."
    ]
    assert section(await dig(server, *extra, "-x", "fd00::6"), "ANSWER")[0].endswith("IN PTR web-6.web.svc.internal.")
    soa = section(await dig(server, *extra, "internal", "SOA"), "ANSWER")
    assert len(soa) == 1 and soa[0].startswith("internal. 3 IN SOA ns.internal. hostmaster.internal. ")
    assert section(await dig(server, *extra, "internal", "NS"), "ANSWER") == ["internal. 5 IN NS ns.internal."]


@pytest.mark.parametrize("extra", TRANSPORTS, ids=["udp", "tcp"])
async def test_negative_answers(server: DnsServer, extra: tuple[str, ...]) -> None:
    nx = await dig(server, *extra, "nope.svc.internal", "A")
    assert status(nx) == "NXDOMAIN"
    assert section(nx, "ANSWER") == []
    authority = section(nx, "AUTHORITY")
    assert len(authority) == 1 and authority[0].startswith("internal. 3 IN SOA ns.internal. ")
    assert authority[0].endswith(" 3600 600 86400 3")
    nodata = await dig(server, *extra, "web.svc.internal", "MX")
    assert status(nodata) == "NOERROR"
    assert section(nodata, "ANSWER") == []
    assert section(nodata, "AUTHORITY")[0].startswith("internal. 3 IN SOA ")


@pytest.mark.parametrize("extra", TRANSPORTS, ids=["udp", "tcp"])
async def test_errors(server: DnsServer, extra: tuple[str, ...]) -> None:
    assert status(await dig(server, *extra, "+opcode=status", "web.svc.internal")) == "NOTIMP"
    assert status(await dig(server, *extra, "+opcode=notify", "web.svc.internal")) == "NOTIMP"
    assert status(await dig(server, *extra, "-c", "CH", "version.bind", "TXT")) == "REFUSED"
    assert status(await dig(server, *extra, "example.com")) == "REFUSED"  # no upstreams configured


@pytest.mark.parametrize("extra", TRANSPORTS, ids=["udp", "tcp"])
async def test_refused_outside_allow(extra: tuple[str, ...]) -> None:
    require_dig()
    async with running_dns(snapshot(instance("web-1", "web", "10.0.0.1")), allow=["10.0.0.0/8"]) as (server, _):
        out = await dig(server, *extra, "web.svc.internal")
        assert status(out) == "REFUSED"
        assert section(out, "ANSWER") == []


async def test_edns_with_dig(server: DnsServer) -> None:
    out = await dig(server, "+bufsize=4096", "+dnssec", "web.svc.internal")
    assert "; EDNS: version: 0, flags: do; udp: 1232" in out
    plain = await dig(server, "+noedns", "web.svc.internal")
    assert "OPT PSEUDOSECTION" not in plain
    assert status(plain) == "NOERROR"
