"""The MySQL codecs (l7/mysql_packets.py): framing, the handshake rewrite, OK/ERR/EOF fields,
and malformed input raising ProtocolError and nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7 import mysql_packets as p
from l7.errors import ProtocolError
from l7.mysql_replies import RESULT, Pending, Replies
from tests.l7.mysql_helpers import (
    eof,
    err,
    greeting,
    handshake_response,
    lenenc_int,
    ok,
    pkt,
    prepare_ok,
    resultset,
    ssl_request,
)


def test_packet_splits_at_16_mib() -> None:
    payload = b"x" * (0xFFFFFF + 5)
    raw = p.packet(payload, 0)
    assert raw[:4] == b"\xff\xff\xff\x00" and raw[4 + 0xFFFFFF : 8 + 0xFFFFFF] == b"\x05\x00\x00\x01"
    exact = p.packet(b"y" * 0xFFFFFF, 3)
    assert exact.endswith(b"\x00\x00\x00\x04")  # an exact multiple ends with an empty packet
    assert p.packet(b"abc", 7) == b"\x03\x00\x00\x07abc"


def test_err_packet() -> None:
    raw = p.err_packet(1142, "42000", "denied by 'x'", 1)
    assert raw == err(1, 1142, "42000", "denied by 'x'")
    assert p.err_sqlstate(raw[4:]) == "42000" and p.err_message(raw[4:]) == "denied by 'x'"
    assert p.err_sqlstate(b"\xff\x10\x04oops") == "HY000"


@pytest.mark.parametrize("n", [0, 250, 251, 65535, 65536, 1 << 24, 1 << 40])
def test_lenenc(n: int) -> None:
    raw = lenenc_int(n) + b"rest"
    assert p.lenenc(raw, 0) == (n, len(raw) - 4)


def test_ok_and_eof_status() -> None:
    assert p.ok_status(ok(1, status=0x0202, affected=300)[4:]) == 0x0202
    assert p.ok_status(eof(5, status=0x000A)[4:]) == 0x000A
    assert p.ok_status(ok(1, status=0x0008, header=0xFE)[4:]) == 0x0008
    with pytest.raises(ProtocolError):
        p.ok_status(b"\x00\x01")


def test_greeting_rewrite() -> None:
    payload = greeting(
        caps=p.CLIENT_PROTOCOL_41
        | p.CLIENT_COMPRESS
        | p.CLIENT_SSL
        | p.CLIENT_QUERY_ATTRIBUTES
        | p.CLIENT_PLUGIN_AUTH
        | p.CLIENT_SECURE_CONNECTION,
        ext=0x3F,
    )[4:]
    out, said = p.rewrite_greeting(payload, tls=False)
    assert said.version == "10.11.6-MariaDB" and said.connection_id == 7 and said.mariadb_capabilities == 0x3F
    now, _ = p.parse_greeting(out)
    assert now.capabilities == p.CLIENT_PROTOCOL_41 | p.CLIENT_PLUGIN_AUTH | p.CLIENT_SECURE_CONNECTION
    assert now.mariadb_capabilities == 0x0C and len(out) == len(payload)
    tls, _ = p.rewrite_greeting(payload, tls=True)
    assert p.parse_greeting(tls)[0].capabilities & p.CLIENT_SSL


def test_handshake_response() -> None:
    raw = handshake_response("bob", "shop", {"program_name": "billing", "_os": "Linux"})[4:]
    resp = p.parse_response(raw)
    assert (resp.user, resp.database, resp.auth_plugin) == ("bob", "shop", "mysql_native_password")
    assert resp.attributes == {"program_name": "billing", "_os": "Linux"}
    compressed = bytearray(raw)
    compressed[0] |= p.CLIENT_COMPRESS
    rewritten = p.rewrite_response(bytes(compressed))
    assert not int.from_bytes(rewritten[:4], "little") & p.CLIENT_COMPRESS
    assert int.from_bytes(rewritten[28:32], "little") == 0x0C
    assert p.parse_response(ssl_request()[4:]).ssl_request
    with pytest.raises(ProtocolError):
        p.parse_response(b"\x00\x00\x00\x00" + b"\0" * 40)  # not protocol 4.1


def test_change_user() -> None:
    body = b"\x11bob\0" + bytes((20,)) + b"a" * 20 + b"db2\0" + b"\x2d\0" + b"mysql_native_password\0"
    change = p.parse_change_user(body, p.CLIENT_SECURE_CONNECTION | p.CLIENT_PLUGIN_AUTH)
    assert (change.user, change.database) == ("bob", "db2")


def test_prepare_ok() -> None:
    assert p.prepare_ok(prepare_ok(9, 2, 3)[4:13]) == (9, 2, 3)


def test_replies_follow_a_result_set_split_anywhere() -> None:
    answer = resultset([[b"a" * 300], [b"b"]]) + ok(1)
    for cut in range(len(answer)):
        replies = Replies()
        replies.fifo.extend([Pending(RESULT), Pending(RESULT)])
        replies.scan(answer[:cut])
        replies.scan(answer[cut:])
        assert not replies.fifo and replies.at_boundary, cut


PARSERS = [
    p.parse_greeting,
    lambda b: p.rewrite_greeting(b, True),
    p.parse_response,
    p.rewrite_response,
    lambda b: p.parse_change_user(b, 0xFFFFFFFF),
    p.ok_status,
    p.prepare_ok,
    lambda b: p.lenenc(b, 0),
]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.integers(0, len(PARSERS) - 1))
def test_parsers_raise_only_protocol_error(data: bytes, which: int) -> None:
    try:
        PARSERS[which](data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_handshakes_raise_only_protocol_error(data: st.DataObject) -> None:
    raw = data.draw(st.sampled_from([greeting()[4:], handshake_response(attrs={"a": "b"})[4:]]))
    at = data.draw(st.integers(0, len(raw)))
    mutated = raw[:at] + data.draw(st.binary(max_size=8)) + raw[at + data.draw(st.integers(0, 8)) :]
    for parse in PARSERS[:5]:
        try:
            parse(mutated)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8), st.integers(0, 3))
def test_reply_tracker_raises_only_protocol_error(chunks: list[bytes], pending: int) -> None:
    replies = Replies(deprecate_eof=bool(pending & 1))
    replies.fifo.extend(Pending(RESULT) for _ in range(pending))
    try:
        for chunk in [pkt(b"\x01", 1), *chunks]:
            replies.scan(chunk)
    except ProtocolError:
        pass
