"""PostgreSQL v3 decoder: hand-built streams split at every offset, fuzzing, a real capture."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7 import pg_messages as m
from l7.errors import ProtocolError
from l7.pg_decoder import (
    PgBackendDecoder,
    PgFrontendDecoder,
    build_message,
    error_response,
    notice_response,
    ready_for_query,
)

CAPTURES = Path(__file__).parent / "captures"


# --- byte builders (written from the protocol docs, independent of the decoder) -----------


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def untyped(body: bytes) -> bytes:
    return struct.pack("!I", len(body) + 4) + body


def startup(**params: str) -> bytes:
    body = struct.pack("!I", 196608) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return untyped(body)


SSL_REQUEST = untyped(struct.pack("!I", 80877103))
GSSENC_REQUEST = untyped(struct.pack("!I", 80877104))

FRONTEND_STREAM = (
    startup(user="alice", database="shop", application_name="psql")
    + msg(b"p", cstr("secret"))
    + msg(b"Q", cstr("SELECT 1; DELETE FROM t"))
    + msg(b"P", cstr("s1") + cstr("SELECT * FROM t WHERE id = $1") + struct.pack("!H", 1) + struct.pack("!I", 23))
    + msg(b"B", cstr("") + cstr("s1") + struct.pack("!HH", 0, 1) + struct.pack("!i", 1) + b"7" + struct.pack("!H", 0))
    + msg(b"D", b"P" + cstr(""))
    + msg(b"E", cstr("") + struct.pack("!i", 0))
    + msg(b"C", b"S" + cstr("s1"))
    + msg(b"S")
    + msg(b"H")
    + msg(b"Q", cstr("COPY t FROM STDIN"))
    + msg(b"d", b"1\tx\n" * 10)
    + msg(b"c")
    + msg(b"f", cstr("aborted"))
    + msg(b"X")
)
FRONTEND_EVENTS = [
    m.StartupMessage(3, 0, (("user", "alice"), ("database", "shop"), ("application_name", "psql"))),
    m.RawMessage("p", 11),
    m.Query("SELECT 1; DELETE FROM t"),
    m.Parse("s1", "SELECT * FROM t WHERE id = $1", 1),
    m.Bind("", "s1"),
    m.Describe("P", ""),
    m.Execute("", 0),
    m.Close("S", "s1"),
    m.Sync(),
    m.Flush(),
    m.Query("COPY t FROM STDIN"),
    m.RawMessage("d", 44),
    m.CopyDone(),
    m.CopyFail("aborted"),
    m.Terminate(),
]

ERR = b'SERROR\0VERROR\0C42P01\0Mrelation "t" does not exist\0\0'
BACKEND_STREAM = (
    msg(b"R", struct.pack("!i", 0))
    + msg(b"S", cstr("server_version") + cstr("16.2"))
    + msg(b"K", struct.pack("!i", 4242) + b"\x01\x02\x03\x04")
    + msg(b"Z", b"I")
    + msg(b"T", struct.pack("!H", 1) + cstr("a") + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0))
    + msg(b"D", struct.pack("!Hi", 1, 1) + b"1")
    + msg(b"C", cstr("SELECT 1"))
    + msg(b"Z", b"T")
    + msg(b"E", ERR)
    + msg(b"N", b"SWARNING\0C01000\0Mcareful\0\0")
    + msg(b"A", struct.pack("!i", 7) + cstr("chan") + cstr("hello"))
    + msg(b"1")
    + msg(b"2")
    + msg(b"t", struct.pack("!HI", 1, 23))
    + msg(b"n")
    + msg(b"s")
    + msg(b"3")
    + msg(b"I")
    + msg(b"G", b"\0" + struct.pack("!HHH", 2, 0, 0))
    + msg(b"d", b"xyz")
    + msg(b"c")
    + msg(b"Z", b"E")
)
BACKEND_EVENTS = [
    m.Authentication(0),
    m.ParameterStatus("server_version", "16.2"),
    m.BackendKeyData(4242, b"\x01\x02\x03\x04"),
    m.ReadyForQuery("I"),
    m.RawMessage("T", 4 + 2 + 2 + 18),
    m.RawMessage("D", 4 + 7),
    m.CommandComplete("SELECT 1"),
    m.ReadyForQuery("T"),
    m.ErrorResponse(
        "ERROR",
        "42P01",
        'relation "t" does not exist',
        (("S", "ERROR"), ("V", "ERROR"), ("C", "42P01"), ("M", 'relation "t" does not exist')),
    ),
    m.NoticeResponse("WARNING", "01000", "careful", (("S", "WARNING"), ("C", "01000"), ("M", "careful"))),
    m.NotificationResponse(7, "chan", "hello"),
    m.ParseComplete(),
    m.BindComplete(),
    m.ParameterDescription(1),
    m.NoData(),
    m.PortalSuspended(),
    m.CloseComplete(),
    m.EmptyQueryResponse(),
    m.CopyResponse("G", 0, 2),
    m.RawMessage("d", 7),
    m.CopyDone(),
    m.ReadyForQuery("E"),
]


def feed_chunks(decoder: PgFrontendDecoder | PgBackendDecoder, chunks: list[bytes]) -> list[m.PgMessage]:
    return [e for c in chunks for e in decoder.feed(c)]


@pytest.mark.parametrize(
    ("factory", "stream", "expected"),
    [(PgFrontendDecoder, FRONTEND_STREAM, FRONTEND_EVENTS), (PgBackendDecoder, BACKEND_STREAM, BACKEND_EVENTS)],
    ids=["frontend", "backend"],
)
def test_every_split_gives_the_same_events(factory, stream, expected) -> None:
    assert factory().feed(stream) == expected
    for i in range(len(stream) + 1):
        d = factory()
        assert feed_chunks(d, [stream[:i], stream[i:]]) == expected, i
        assert d.at_boundary and d.buffered == 0
    d = factory()
    assert feed_chunks(d, [stream[i : i + 1] for i in range(len(stream))]) == expected
    for step in (2, 3, 7, 13):  # three-or-more-piece splits
        assert feed_chunks(factory(), [stream[i : i + step] for i in range(0, len(stream), step)]) == expected


def test_ssl_request_refused_then_startup() -> None:
    fe, be = PgFrontendDecoder(), PgBackendDecoder()
    assert fe.feed(SSL_REQUEST) == [m.SSLRequest()]
    be.expect_ssl_response()
    assert be.feed(b"N" + msg(b"R", struct.pack("!i", 0))) == [m.EncryptionResponse("N"), m.Authentication(0)]
    assert not m.EncryptionResponse("N").accepted and m.EncryptionResponse("S").accepted
    # after "N" the client sends its real startup packet (the decoder stays in startup mode)
    assert fe.feed(startup(user="u") + msg(b"Q", cstr("SELECT 1"))) == [
        m.StartupMessage(3, 0, (("user", "u"),)),
        m.Query("SELECT 1"),
    ]


def test_gssenc_then_ssl_then_startup_split_everywhere() -> None:
    stream = GSSENC_REQUEST + SSL_REQUEST + startup(user="u", database="d")
    expected = [m.GSSENCRequest(), m.SSLRequest(), m.StartupMessage(3, 0, (("user", "u"), ("database", "d")))]
    for i in range(len(stream) + 1):
        assert feed_chunks(PgFrontendDecoder(), [stream[:i], stream[i:]]) == expected


def test_expect_startup_explicitly_and_not_mid_message() -> None:
    fe = PgFrontendDecoder()
    fe.feed(startup(user="u"))
    fe.expect_startup()
    assert fe.feed(startup(user="v")) == [m.StartupMessage(3, 0, (("user", "v"),))]
    fe.expect_startup()
    fe.feed(startup(user="w")[:3])
    with pytest.raises(ProtocolError):
        fe.expect_startup()


def test_backend_encryption_response_can_be_an_error_instead() -> None:
    be = PgBackendDecoder()
    be.expect_ssl_response()
    assert be.feed(msg(b"E", ERR))[0].code == "42P01"  # type: ignore[attr-defined]


def test_cancel_request_and_nothing_after() -> None:
    fe = PgFrontendDecoder()
    cancel = untyped(struct.pack("!Iii", 80877102, 1234, -5))
    assert fe.feed(cancel) == [m.CancelRequest(1234, struct.pack("!i", -5))]
    with pytest.raises(ProtocolError):
        fe.feed(b"x")


def test_large_data_row_is_streamed_not_held() -> None:
    payload = os.urandom(5 * 1024 * 1024)
    row = msg(b"D", struct.pack("!Hi", 1, len(payload)) + payload)
    stream = row + msg(b"C", cstr("SELECT 1")) + msg(b"Z", b"I")
    d = PgBackendDecoder(max_message_size=1024)  # the cap applies to buffered types only
    events: list[m.PgMessage] = []
    peak = 0
    for i in range(0, len(stream), 64 * 1024):
        events += d.feed(stream[i : i + 64 * 1024])
        peak = max(peak, d.buffered)
    assert events == [m.RawMessage("D", len(row) - 1), m.CommandComplete("SELECT 1"), m.ReadyForQuery("I")]
    assert peak <= 64


def test_large_bind_is_reported_from_its_names_and_its_values_skipped() -> None:
    value = os.urandom(5 * 1024 * 1024)
    bind = msg(b"B", cstr("p1") + cstr("s1") + struct.pack("!HHi", 0, 1, len(value)) + value + struct.pack("!H", 0))
    head = startup(user="u")
    stream = head + bind + msg(b"E", cstr("p1") + struct.pack("!i", 0)) + msg(b"S")
    d = PgFrontendDecoder(max_message_size=1024)  # Bind is streamed: the cap does not apply
    events: list[m.PgMessage] = []
    ends: list[int] = []
    peak = 0
    for i in range(0, len(stream), 64 * 1024):
        events += d.feed(stream[i : i + 64 * 1024])
        ends += d.ends
        peak = max(peak, d.buffered)
    assert events[1:] == [m.Bind("p1", "s1"), m.Execute("p1", 0), m.Sync()]
    assert ends[1] == len(head) + len(bind)  # where the Bind ends, though reported early
    assert ends[-1] == len(stream) == d.offset
    assert peak <= 64 * 1024


@pytest.mark.parametrize(
    ("factory", "data"),
    [
        (PgBackendDecoder, b"Z\0\0\0\3"),  # length < 4
        (PgBackendDecoder, b"?\0\0\0\4"),  # unknown type (strict)
        (PgBackendDecoder, msg(b"Z", b"X")),  # bad transaction status
        (PgBackendDecoder, msg(b"Z", b"")),  # truncated field
        (PgBackendDecoder, msg(b"C", b"SELECT 1")),  # unterminated string
        (PgBackendDecoder, msg(b"S", cstr("a") + cstr("b") + b"junk")),  # trailing bytes
        (PgBackendDecoder, b"C\x7f\xff\xff\xff"),  # over the cap for a buffered type
        (PgFrontendDecoder, untyped(struct.pack("!I", 2 << 16))),  # protocol 2.0
        (PgFrontendDecoder, b"\0\0\0\3"),  # startup length < 8
        (PgFrontendDecoder, b"\x16\x03\x01\x02\x00"),  # a TLS ClientHello where startup was expected
        (PgFrontendDecoder, startup(user="u") + msg(b"P", cstr("") + cstr("q") + struct.pack("!H", 2))),
        (PgFrontendDecoder, startup(user="u") + msg(b"D", b"Z" + cstr("x"))),  # Describe kind
    ],
)
def test_malformed_input_raises_protocol_error_and_poisons(factory, data) -> None:
    d = factory()
    with pytest.raises(ProtocolError):
        d.feed(data)
    with pytest.raises(ProtocolError):
        d.feed(b"")


def test_lenient_mode_streams_unknown_types() -> None:
    d = PgBackendDecoder(strict=False)
    assert d.feed(msg(b"?", b"abc") + msg(b"Z", b"I")) == [m.RawMessage("?", 7), m.ReadyForQuery("I")]


def test_builders_round_trip() -> None:
    data = error_response("denied by policy", "42501") + notice_response("hm") + ready_for_query("T")
    assert data[:1] == b"E" and build_message(b"Z", b"T") == ready_for_query("T")
    e, n, z = PgBackendDecoder().feed(data)
    assert (e.severity, e.code, e.message) == ("ERROR", "42501", "denied by policy")  # type: ignore[attr-defined]
    assert isinstance(n, m.NoticeResponse) and n.message == "hm" and n.severity == "WARNING"
    assert z == m.ReadyForQuery("T")
    with pytest.raises(ValueError):
        ready_for_query("Q")


# --- property tests --------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.booleans(), st.booleans())
def test_arbitrary_bytes_only_raise_protocol_error(data: bytes, frontend: bool, strict: bool) -> None:
    d = PgFrontendDecoder(strict=strict) if frontend else PgBackendDecoder(strict=strict)
    try:
        d.feed(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_a_valid_prefix(data: bytes) -> None:
    for d, prefix in ((PgFrontendDecoder(), FRONTEND_STREAM[:-5]), (PgBackendDecoder(), BACKEND_STREAM)):
        try:
            d.feed(prefix + data)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_valid_streams_round_trip_through_random_splits(data: st.DataObject) -> None:
    frontend = data.draw(st.booleans())
    stream, expected = (FRONTEND_STREAM, FRONTEND_EVENTS) if frontend else (BACKEND_STREAM, BACKEND_EVENTS)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    d = PgFrontendDecoder() if frontend else PgBackendDecoder()
    assert feed_chunks(d, chunks) == expected


# --- a real capture: psql through a recording relay to the machine's PostgreSQL -------------

PG_ADDR = ("127.0.0.1", 5432)
CAPTURE_SQL = "SELECT 1 AS one; CREATE TEMP TABLE pm_t (a int); INSERT INTO pm_t VALUES (1), (2); SELECT * FROM pm_t"


def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
    while chunk := src.recv(65536):
        record += chunk
        dst.sendall(chunk)
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def record_psql(sql: str) -> tuple[bytes, bytes]:
    """Run psql against the local server through a relay; return (client bytes, server bytes)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    frontend, backend = bytearray(), bytearray()

    def relay() -> None:
        client, _ = listener.accept()
        upstream = socket.create_connection(PG_ADDR)
        t = threading.Thread(target=_pump, args=(upstream, client, backend))
        t.start()
        _pump(client, upstream, frontend)
        t.join()
        client.close()
        upstream.close()

    thread = threading.Thread(target=relay)
    thread.start()
    env = {**os.environ, "PGSSLMODE": "disable", "PGGSSENCMODE": "disable", "PGCONNECT_TIMEOUT": "5"}
    args = ["psql", "-X", "-h", "127.0.0.1", "-p", str(port), "-d", "test", "-c", sql]
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=20)
    thread.join(timeout=10)
    listener.close()
    return bytes(frontend), bytes(backend)


def _server_up() -> bool:
    try:
        socket.create_connection(PG_ADDR, timeout=1).close()
    except OSError:
        return False
    return subprocess.run(["which", "psql"], capture_output=True).returncode == 0


def check_capture(frontend: bytes, backend: bytes) -> None:
    fe = PgFrontendDecoder().feed(frontend)
    start = fe[0]
    assert isinstance(start, m.StartupMessage) and start.params["database"] == "test"
    assert "user" in start.params
    assert m.Query(CAPTURE_SQL) in fe and fe[-1] == m.Terminate()
    be = PgBackendDecoder().feed(backend)
    assert be[0] == m.Authentication(0)
    assert any(isinstance(e, m.BackendKeyData) for e in be)
    tags = [e.tag for e in be if isinstance(e, m.CommandComplete)]
    assert tags == ["SELECT 1", "CREATE TABLE", "INSERT 0 2", "SELECT 2"]
    assert [e for e in be if isinstance(e, m.RawMessage)].count(m.RawMessage("D", 11)) == 3  # 1, 1, 2
    assert be[-1] == m.ReadyForQuery("I")


def test_recorded_psql_capture() -> None:
    frontend, backend = (CAPTURES / "psql_frontend.bin").read_bytes(), (CAPTURES / "psql_backend.bin").read_bytes()
    check_capture(frontend, backend)
    for factory, stream in ((PgFrontendDecoder, frontend), (PgBackendDecoder, backend)):
        whole = factory().feed(stream)
        for i in range(len(stream) + 1):
            assert feed_chunks(factory(), [stream[:i], stream[i:]]) == whole, i


@pytest.mark.skipif(not _server_up(), reason="no PostgreSQL on 127.0.0.1:5432 or no psql")
def test_live_psql_through_relay() -> None:
    frontend, backend = record_psql(CAPTURE_SQL)
    if os.environ.get("PG_RECAPTURE"):  # PG_RECAPTURE=1 refreshes the fixture files
        (CAPTURES / "psql_frontend.bin").write_bytes(frontend)
        (CAPTURES / "psql_backend.bin").write_bytes(backend)
    check_capture(frontend, backend)
