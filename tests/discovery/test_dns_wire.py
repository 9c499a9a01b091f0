"""The hand-written query scanner and reply builders, against dnspython's encoder and parser."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

from discovery.dns_wire import (
    FORMERR,
    MODE_CD,
    MODE_DO,
    MODE_EDNS,
    MODE_RD,
    REFUSED,
    error_reply,
    header_only,
    name_labels,
    name_wire,
    question_end,
    scan_query,
    truncate_reply,
)
from discovery.dns_zone import reverse_address


def query(name: str = "web.svc.internal", rdtype: str = "A", **kwargs: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()  # type: ignore[arg-type]


def test_scan_plain_query() -> None:
    wire = query()
    nend, mode, limit = scan_query(wire) or (0, 0, 0)
    assert wire[12:nend] == b"\x03web\x03svc\x08internal\x00"
    assert wire[nend : nend + 4] == b"\x00\x01\x00\x01"
    assert mode == MODE_RD
    assert limit == 512


@pytest.mark.parametrize(
    ("kwargs", "mode", "limit"),
    [
        ({"use_edns": 0, "payload": 4096}, MODE_RD | MODE_EDNS, 1232),
        ({"use_edns": 0, "payload": 100}, MODE_RD | MODE_EDNS, 512),
        ({"use_edns": 0, "payload": 800}, MODE_RD | MODE_EDNS, 800),
        ({"want_dnssec": True}, MODE_RD | MODE_EDNS | MODE_DO, 1232),
        (
            {"use_edns": 0, "options": [dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"12345678")]},
            MODE_RD | MODE_EDNS,
            1232,
        ),
    ],
)
def test_scan_edns(kwargs: dict[str, object], mode: int, limit: int) -> None:
    scanned = scan_query(query(**kwargs))  # type: ignore[arg-type]
    assert scanned is not None
    assert scanned[1:] == (mode, limit)


def test_scan_flags_rd_and_cd() -> None:
    message = dns.message.make_query("web.svc.internal", "A")
    message.flags = dns.flags.CD
    scanned = scan_query(message.to_wire())
    assert scanned is not None and scanned[1] == MODE_CD


def test_scan_root_and_long_names() -> None:
    root = query(".", "NS")
    assert scan_query(root) is not None and scan_query(root)[0] == 13  # type: ignore[index]
    longest = ".".join(["a" * 63] * 3 + ["a" * 61])  # 255 bytes on the wire
    assert scan_query(query(longest)) is not None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: w[:4] + b"\x00\x02" + w[6:],  # QDCOUNT 2
        lambda w: w[:6] + b"\x00\x01" + w[8:],  # ANCOUNT 1
        lambda w: w + b"\x00",  # trailing byte
        lambda w: w[:12] + b"\xc0\x0c" + w[-4:],  # a compression pointer
        lambda w: w[:10] + b"\x00\x01" + w[12:] + b"\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00",  # A, not OPT
    ],
)
def test_scan_leaves_unusual_shapes_to_the_slow_path(mutate: object) -> None:
    assert scan_query(mutate(query())) is None  # type: ignore[operator]


def test_scan_edns_version_1_and_bad_rdlen_go_to_the_slow_path() -> None:
    assert scan_query(query(use_edns=1)) is None
    wire = bytearray(query(use_edns=0))
    wire[-1] = 5  # RDLEN says 5 option bytes, none follow
    assert scan_query(bytes(wire)) is None


def test_scan_never_raises_on_any_prefix() -> None:
    for wire in (query(), query(use_edns=0, payload=1232), query("x" * 63 + ".y", "SRV", want_dnssec=True)):
        for cut in range(12, len(wire)):
            assert scan_query(wire[:cut]) is None, cut
        assert scan_query(wire) is not None


def test_names_round_trip() -> None:
    labels = (b"_postgres", b"_tcp", b"db", b"svc", b"internal")
    wire = name_wire(labels)
    assert wire == dns.name.from_text("_postgres._tcp.db.svc.internal").to_wire()
    assert name_labels(wire) == labels
    assert name_wire(()) == b"\x00"


def test_error_replies_parse() -> None:
    wire = query(use_edns=0)
    end = question_end(wire)
    assert end is not None
    refused = dns.message.from_wire(error_reply(wire, wire[12:end], REFUSED, MODE_EDNS | MODE_RD, True))
    assert refused.rcode() == dns.rcode.REFUSED
    assert refused.question[0].name.to_text() == "web.svc.internal."
    assert refused.edns == 0
    assert refused.flags & dns.flags.RA and refused.flags & dns.flags.RD
    formerr = header_only(b"\x12\x34\x01\x00" + b"\xff" * 20, FORMERR)
    assert formerr == b"\x12\x34\x81\x01" + b"\x00" * 8


def test_truncate_reply_keeps_header_and_question() -> None:
    message = dns.message.make_query("web.svc.internal", "A")
    response = dns.message.make_response(message)
    response.answer.append(dns.rrset.from_text("web.svc.internal.", 5, "IN", "A", "10.0.0.1"))
    wire = response.to_wire()
    end = question_end(wire)
    assert end is not None
    cut = dns.message.from_wire(truncate_reply(wire, end))
    assert cut.flags & dns.flags.TC
    assert cut.answer == []
    assert cut.question == response.question


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("1.2.0.10.in-addr.arpa", "10.0.2.1"),
        ("b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.0.0.0.0.1.2.3.4.ip6.arpa", "4321:0:1:2:3:4:567:89ab"),
        ("2.0.10.in-addr.arpa", None),  # a partial name: a network, not an address
        ("256.2.0.10.in-addr.arpa", None),
        ("x.2.0.10.in-addr.arpa", None),
        ("g.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.0.0.0.0.1.2.3.4.ip6.arpa", None),
        ("example.com", None),
    ],
)
def test_reverse_address(name: str, address: str | None) -> None:
    labels = tuple(label.encode() for label in name.split("."))
    assert reverse_address(labels) == address
