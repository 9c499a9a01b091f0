"""The MySQL session filter, sans-IO: byte strings in, bytes out and counters. Every exchange
is also fed one byte at a time, which must write the same bytes and count the same."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l7.mysql_filter import MySqlSession
from l7.mysql_packets import parse_greeting
from l7.policy import PolicyEngine
from l7.policy_config import PolicyConfig
from l7.sql_context import SqlContext
from router.sql_metrics import SqlStats
from tests.l7.mysql_helpers import (
    binary_resultset,
    command,
    err,
    execute,
    greeting,
    handshake_response,
    ok,
    pkt,
    prepare_ok,
    query,
    resultset,
    ssl_request,
)

RULES: list[dict[str, Any]] = [
    {"name": "no-drop", "match": {"verbs": ["DROP", "TRUNCATE"]}, "action": "deny"},
    {"name": "watch-audit", "match": {"tables": ["audit"]}, "action": "log"},
    {"name": "limited", "match": {"tables": ["limited"]}, "action": {"rate_limit": "1/m", "over": "deny"}},
    {"name": "slowed", "match": {"tables": ["slowed"]}, "action": {"rate_limit": "1/m", "over": "delay"}},
]


class Hooks:
    def __init__(self) -> None:
        self.closed: list[str] = []
        self.paused: list[float] = []
        self.tls = 0
        self.early: list[bytes] = []

    def start_tls(self, early: bytes = b"") -> None:
        self.tls += 1
        self.early.append(early)

    def pause(self, seconds: float) -> None:
        self.paused.append(seconds)

    def close(self, reason: str) -> None:
        self.closed.append(reason)


class Run:
    """A session with its two outputs."""

    def __init__(self, rules: list[dict[str, Any]] | None = None, split: bool = False, tls: bool = False) -> None:
        self.stats = SqlStats()
        clf, clf_bs = self.stats.classifiers("mysql")
        listed = PolicyConfig.model_validate({"policies": rules or []}).policies
        engine = PolicyEngine(listed) if rules else None
        self.ctx = SqlContext(
            "db", self.stats, clf, clf_bs, protocol="mysql", engine=engine, rules=list(listed), tls=tls
        )
        self.server: list[bytes] = []
        self.client: list[bytes] = []
        self.hooks = Hooks()
        self.session = MySqlSession(lambda: self.ctx, self.server.append, self.client.append, self.hooks, "10.0.0.1")
        self.split = split

    def feed(self, side: str, data: bytes) -> None:
        fn: Callable[[bytes], None] = self.session.from_client if side == "c" else self.session.from_server
        if self.split:
            for i in range(len(data)):
                fn(data[i : i + 1])
        elif data:
            fn(data)

    def c(self, data: bytes) -> bytes:
        """Client bytes in; what reached the server."""
        before = len(self.server)
        self.feed("c", data)
        return b"".join(self.server[before:])

    def s(self, data: bytes) -> bytes:
        before = len(self.client)
        self.feed("s", data)
        return b"".join(self.client[before:])

    def login(self, deprecate_eof: bool = False, **kw: Any) -> None:
        self.s(greeting())
        self.c(handshake_response(deprecate_eof=deprecate_eof, **kw))
        self.s(ok(2))

    def counts(self, name: str) -> dict[tuple[str, ...], float]:
        return dict(getattr(self.stats, name).values)

    def verbs(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in self.stats.statements.values.items():
            out[key[-1]] = out.get(key[-1], 0) + value
        return out


splits = pytest.mark.parametrize("split", [False, True], ids=["whole", "bytewise"])
WHO = ("db", "mysql", "app", "", "", "")


@splits
def test_handshake_rewrites_capabilities_and_identifies(split: bool) -> None:
    run = Run(split=split)
    out = run.s(greeting())
    said, _ = parse_greeting(out[4:])
    assert not said.capabilities & 0x20  # CLIENT_COMPRESS
    assert not said.capabilities & 0x800  # CLIENT_SSL (no tls)
    assert said.mariadb_capabilities == 0x1F & 0xC
    assert said.auth_plugin == "mysql_native_password"
    sent = run.c(handshake_response(attrs={"program_name": "billing"}, caps=0x000FA6AD | 0x380000))
    assert not int.from_bytes(sent[4:8], "little") & 0x20  # compression cleared towards the server
    assert sent[3] == 1
    assert run.s(ok(2)) == ok(2)
    assert run.session.app == "billing" and run.session.user == "app" and run.session.database == "test"
    assert run.counts("sessions") == {("db", "mysql", "billing", "", "", ""): 1}
    run.session.end()
    assert run.counts("active") == {("db", "mysql", "billing", "", "", ""): 0}


@splits
def test_queries_are_counted_with_latency_and_transactions(split: bool) -> None:
    run = Run(RULES, split=split)
    run.login()
    assert run.c(query("SELECT * FROM t WHERE id = 1")) == query("SELECT * FROM t WHERE id = 1")
    assert run.s(resultset([[b"1"], [b"2"]])) == resultset([[b"1"], [b"2"]])
    run.c(query("BEGIN"))
    run.s(ok(1, status=3))
    run.c(query("COMMIT"))
    run.s(ok(1))
    run.c(query("ROLLBACK"))
    run.s(ok(1))
    run.c(query("SELECT nope"))
    run.s(err(1, 1054, "42S22", "Unknown column"))
    assert run.verbs() == {"SELECT": 2, "BEGIN": 1, "COMMIT": 1, "ROLLBACK": 1}
    assert run.counts("transactions") == {(*WHO, "committed"): 1, (*WHO, "rolled_back"): 1}
    assert run.counts("errors") == {(*WHO, "42"): 1}
    assert sum(len(v) for v in run.stats.durations.series.values()) > 0
    assert not run.session.fifo


@splits
def test_denied_query_gets_an_err_and_never_reaches_the_server(split: bool) -> None:
    run = Run(RULES, split=split)
    run.login()
    assert run.c(query("SELECT 1; DROP TABLE t")) == b""
    answer = err(1, 1142, "42000", "statement denied by policy 'no-drop'")
    out = b"".join(run.client)
    assert out.endswith(answer)
    assert b"\xff\x76\x04#42000statement denied by policy 'no-drop'" in out
    assert out[-len(answer) :][3] == 1  # sequence id 1
    assert run.counts("denied") == {(*WHO, "no-drop"): 1}
    assert run.verbs() == {}
    # still usable
    assert run.c(query("SELECT 2")) == query("SELECT 2")
    run.s(resultset([[b"2"]]))
    assert run.verbs() == {"SELECT": 1}


@splits
def test_refusal_waits_for_earlier_answers(split: bool) -> None:
    run = Run(RULES, split=split)
    run.login(deprecate_eof=True)
    sent = run.c(query("SELECT 1") + query("DROP TABLE t") + query("SELECT 3"))
    assert sent == query("SELECT 1") + query("SELECT 3")
    assert b"".join(run.client).endswith(ok(2))  # nothing answered yet
    first, third = resultset([[b"1"]], deprecate_eof=True), resultset([[b"3"]], deprecate_eof=True)
    out = run.s(first + third)
    refusal = err(1, 1142, "42000", "statement denied by policy 'no-drop'")
    assert out == first + refusal + third


@splits
def test_prepared_statements(split: bool) -> None:
    run = Run(RULES, split=split)
    run.login(deprecate_eof=split)
    prep = command(0x16, b"SELECT x FROM t WHERE id = ?")
    assert run.c(prep) == prep
    run.s(prepare_ok(5, 1, 1, deprecate_eof=split))
    assert run.session.statements[5][0].verb == "SELECT"
    for _ in range(2):
        assert run.c(execute(5, b"\x01\x03\x00\x07\x00\x00\x00")) == execute(5, b"\x01\x03\x00\x07\x00\x00\x00")
        run.s(binary_resultset([b"a", b"b"], deprecate_eof=split))
    assert run.verbs() == {"SELECT": 2}
    # a denied PREPARE: an ERR, no statement id
    assert run.c(command(0x16, b"DROP TABLE t")) == b""
    assert run.client[-1][4] == 0xFF
    # a rate-limited statement: prepared fine, the second EXECUTE refused with 1226
    run.c(command(0x16, b"SELECT x FROM limited"))
    run.s(prepare_ok(6, 1, 0, deprecate_eof=split))
    assert run.c(execute(6)) == execute(6)
    run.s(binary_resultset([b"a"], deprecate_eof=split))
    assert run.c(execute(6)) == b""
    assert b"\xff\xca\x04#42000rate limit" in b"".join(run.client)
    # close, long data, reset: no answers for the first two
    run.c(command(0x19, (5).to_bytes(4, "little")))
    assert 5 not in run.session.statements
    run.c(command(0x18, (6).to_bytes(4, "little") + b"\0\0" + b"blob" * 100))
    run.c(command(0x1A, (6).to_bytes(4, "little")))
    run.s(ok(1))
    assert not run.session.fifo
    # an EXECUTE of an unknown id is opaque: refused while a deny rule applies (fail closed)
    assert run.c(execute(99)) == b""
    assert b"no-drop" in run.client[-1] and b"cannot be known" in run.client[-1]


def test_opaque_statements_pass_when_nothing_enforces() -> None:
    run = Run([{"name": "watch", "match": {"tables": ["audit"]}, "action": "log"}])
    run.login()
    assert run.c(execute(99)) == execute(99)
    run.s(err(1, 1243, "HY000", "Unknown prepared statement handler"))
    sql = "SET @q = 'DELETE FROM t'; PREPARE s FROM @q; EXECUTE s"
    assert run.c(query(sql)) == query(sql)
    run = Run(RULES)
    run.login()
    assert run.c(query(sql)) == b""  # EXECUTE of a statement prepared from a variable: opaque
    assert run.verbs() == {}


def test_execute_denied_after_a_reload() -> None:
    run = Run([])
    run.login()
    run.c(command(0x16, b"DELETE FROM t WHERE id = ?"))
    run.s(prepare_ok(1, 0, 1))
    assert run.c(execute(1)) == execute(1)
    run.s(ok(1, affected=1))
    rules = [{"name": "no-delete", "match": {"verbs": ["DELETE"]}, "action": "deny"}]
    run.ctx.engine = PolicyEngine(PolicyConfig.model_validate({"policies": rules}))
    assert run.c(execute(1, b"\x01" * 4000)) == b""
    assert b"no-delete" in run.client[-1]


@splits
def test_multi_results_infile_use_and_init_db(split: bool) -> None:
    run = Run(RULES, split=split)
    run.login()
    run.c(query("SELECT 1; SELECT 2; USE other"))
    run.s(resultset([[b"1"]], status=0x0A) + resultset([[b"2"]], seq=1, status=0x0A) + ok(1))
    assert run.session.database == "other"
    assert not run.session.fifo
    run.c(command(0x02, b"third"))
    run.s(ok(1))
    assert run.session.database == "third"
    # LOAD DATA LOCAL INFILE: the server asks (0xFB), the file streams, an empty packet ends it
    run.c(query("LOAD DATA LOCAL INFILE 'f' INTO TABLE t"))
    run.s(pkt(b"\xfbf", 1))
    data = b"".join(pkt(b"%d\n" % i, i + 2) for i in range(300)) + pkt(b"", 302)  # ids wrap past 255
    assert run.c(data) == data
    run.s(ok(47, affected=300))
    assert not run.session.fifo and not run.session._infile
    keys = {key[-2:] for key in run.counts("statements")}
    assert ("test", "USE") in keys and ("third", "LOAD") in keys


def test_no_backslash_escapes_switches_classifier() -> None:
    run = Run(RULES)
    run.login()
    run.c(query("SET sql_mode = 'NO_BACKSLASH_ESCAPES'"))
    run.s(ok(1, status=0x0202))
    assert run.session.other_strings
    # with NO_BACKSLASH_ESCAPES this is two statements, the second denied
    assert run.c(query("SELECT 'a\\'; DROP TABLE t; -- '")) == b""


def test_large_packets_stream_and_held_query_continues() -> None:
    run = Run(RULES)
    run.login()
    sql = b"SELECT '" + b"x" * (0xFFFFFF + 10) + b"'"
    body = b"\x03" + sql
    raw = pkt(body[:0xFFFFFF], 0) + pkt(body[0xFFFFFF:], 1)
    sent = b"".join(run.c(raw[i : i + 65536]) for i in range(0, len(raw), 65536))
    assert sent == raw
    # a long row: forwarded chunk by chunk as it arrives
    row = pkt(b"\xfe" + (0xFFFFF0).to_bytes(8, "little") + b"y" * (0xFFFFFF - 9), 4) + pkt(b"y" * 100, 5)
    answer = pkt(b"\x01", 1) + pkt(b"\x03def" + b"\0" * 20, 2) + pkt(b"\xfe\0\0\2\0", 3) + row + pkt(b"\xfe\0\0\2\0", 6)
    for i in range(0, len(answer), 65536):
        chunk = answer[i : i + 65536]
        assert run.s(chunk) == chunk
    assert not run.session.fifo


def test_rate_limit_delay_pauses_and_resumes() -> None:
    run = Run(RULES)
    run.login()
    assert run.c(query("SELECT * FROM slowed")) == query("SELECT * FROM slowed")
    run.s(resultset([[b"1"]]))
    assert run.c(query("SELECT * FROM slowed") + query("SELECT 2")) == b""
    assert run.hooks.paused and run.counts("delayed") == {(*WHO, "slowed"): 1}
    assert run.c(query("SELECT 3")) == b""  # held behind
    run.session.resume()
    assert b"".join(run.server).endswith(query("SELECT * FROM slowed") + query("SELECT 2") + query("SELECT 3"))


def test_tls_shifts_sequence_ids_until_authenticated() -> None:
    run = Run(RULES, tls=True)
    out = run.s(greeting())
    assert parse_greeting(out[4:])[0].capabilities & 0x800
    assert run.c(ssl_request() + b"\x16\x03\x01hello") == b""
    assert run.hooks.tls == 1 and run.hooks.early == [b"\x16\x03\x01hello"]  # TLS bytes behind it
    sent = run.c(handshake_response(seq=2, caps=0x000FA68D | 0x800 | 0x380000))
    assert sent[3] == 1 and not int.from_bytes(sent[4:8], "little") & 0x800
    switch = pkt(b"\xfeclient_ed25519\0" + b"s" * 32, 2)
    assert run.s(switch)[3] == 3
    assert run.c(pkt(b"k" * 64, 4))[3] == 3
    assert run.s(ok(4))[3] == 5
    assert run.c(query("SELECT 1")) == query("SELECT 1")


def test_change_user_and_reset_connection() -> None:
    run = Run(RULES)
    run.login()
    run.c(command(0x16, b"SELECT 1"))
    run.s(prepare_ok(1, 1, 0))
    body = b"bob\0" + bytes((20,)) + b"a" * 20 + b"db2\0" + b"\x2d\0" + b"mysql_native_password\0"
    run.c(command(0x11, body))
    assert run.session.user == "bob" and run.session.database == "db2" and not run.session.statements
    run.s(pkt(b"\xfemysql_native_password\0" + b"n" * 21, 1))
    assert run.c(pkt(b"r" * 20, 2)) == pkt(b"r" * 20, 2)
    run.s(ok(3))
    assert not run.session.fifo
    active = run.counts("active")
    assert active[("db", "mysql", "app", "", "", "")] == 0 and active[("db", "mysql", "bob", "", "", "")] == 1
    run.c(command(0x16, b"SELECT 1"))
    run.s(prepare_ok(2, 1, 0))
    run.c(command(0x1F))
    run.s(ok(1))
    assert not run.session.statements
    for cmd, answer in ((0x0E, ok(1)), (0x1B, pkt(b"\xfe\0\0\2\0", 1)), (0x09, pkt(b"Uptime: 5", 1))):
        run.c(command(cmd, b"\0\0" if cmd == 0x1B else b""))
        run.s(answer)
    run.c(command(0x04, b"t\0"))
    run.s(pkt(b"\x03def" + b"\0" * 20, 1) + pkt(b"\xfe\0\0\2\0", 2))
    assert not run.session.fifo
    run.c(command(0x01))
    assert not run.hooks.closed


def test_undecodable_bytes() -> None:
    run = Run([])  # nothing enforces: forwarded blind
    run.login()
    assert run.c(pkt(b"junk", 3)) == pkt(b"junk", 3)
    assert run.session.passthrough
    assert run.counts("decode_errors") == {("db", "mysql", "client"): 1}
    run = Run(RULES)  # enforcing: closed
    run.login()
    run.c(pkt(b"junk", 3))
    assert run.hooks.closed
    run = Run([])  # before the handshake: closed
    run.s(b"\x05\0\0\0\x09abcd")
    assert run.hooks.closed
    run = Run([])
    run.login()
    run.c(query("SELECT 1"))
    run.s(pkt(b"\0", 1) + pkt(b"\x07", 2))  # an OK cut short
    assert run.counts("decode_errors") == {("db", "mysql", "server"): 1}


def conversation() -> list[tuple[str, bytes]]:
    return [
        ("s", greeting()),
        ("c", handshake_response(attrs={"program_name": "x"})),
        ("s", ok(2)),
        ("c", query("SELECT a FROM t WHERE id = 1")),
        ("s", resultset([[b"1"], [b"22"]])),
        ("c", command(0x16, b"SELECT ? FROM t")),
        ("s", prepare_ok(1, 1, 1)),
        ("c", execute(1, b"\x01\x03\x00\x07\x00\x00\x00")),
        ("s", binary_resultset([b"v"])),
        ("c", query("DROP TABLE t")),
        ("c", query("SELECT 1; SELECT 2")),
        ("s", resultset([[b"1"]], status=0x0A) + resultset([[b"2"]])),
    ]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_conversations_never_raise(data: st.DataObject) -> None:
    conv = conversation()
    index = data.draw(st.integers(0, len(conv) - 1))
    side, chunk = conv[index]
    at = data.draw(st.integers(0, len(chunk)))
    junk = data.draw(st.binary(max_size=24))
    cut = data.draw(st.integers(0, 8))
    conv[index] = (side, chunk[:at] + junk + chunk[at + cut :])
    run = Run(RULES if data.draw(st.booleans()) else [])
    for side, chunk in conv:
        run.feed(side, chunk)  # never raises: undecodable bytes close or pass through


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("cs"), st.binary(max_size=64)), max_size=12), st.booleans())
def test_fuzz_random_bytes_never_raise(chunks: list[tuple[str, bytes]], login: bool) -> None:
    run = Run(RULES)
    if login:
        run.login()
    for side, chunk in chunks:
        run.feed(side, chunk)


def test_mariadb_pipelined_prepare_and_execute_last() -> None:
    run = Run(RULES)
    run.login()
    pipelined = command(0x16, b"DELETE FROM t WHERE id = ?") + execute(0xFFFFFFFF, b"\x01\x03\x00\x07\x00\x00\x00")
    assert run.c(pipelined) == pipelined
    run.s(prepare_ok(3, 0, 1) + ok(1, affected=1))
    assert run.verbs() == {"DELETE": 1} and not run.session.fifo
    assert run.c(command(0x16, b"DROP TABLE t") + execute(0xFFFFFFFF)) == b""
    # both refused: the server's "last prepared" is still the DELETE
    assert run.counts("denied") == {(*WHO, "no-drop"): 2}
    assert [c[4] for c in run.client[-2:]] == [0xFF, 0xFF]
    assert run.verbs() == {"DELETE": 1}


def test_dropping_the_current_database_leaves_none() -> None:
    run = Run([])
    run.login()
    run.c(query("DROP DATABASE other"))
    run.s(ok(1))
    assert run.session.database == "test"
    run.c(query("DROP DATABASE Test"))
    run.s(ok(1))
    assert run.session.database == ""


def test_refusal_of_a_multi_packet_command_takes_the_next_sequence_id() -> None:
    run = Run(RULES)
    run.login()
    body = b"\x03DROP TABLE t /* " + b"x" * 0xFFFFFF + b" */"
    raw = pkt(body[:0xFFFFFF], 0) + pkt(body[0xFFFFFF:], 1)
    assert run.c(raw) == b""
    assert run.client[-1][3] == 2 and run.client[-1][4] == 0xFF
    assert run.c(query("SELECT 1")) == query("SELECT 1")


@pytest.mark.parametrize("cut", [b"\x64\x00\x00\x00\x03SELECT", b"\xff\xff\xff\x00\x03" + b"x" * 1024, b"\x05\x00"])
def test_a_client_leaving_mid_packet_is_a_decode_error(cut: bytes) -> None:
    run = Run(RULES)
    run.login()
    run.c(cut)
    run.session.end()
    assert run.counts("decode_errors") == {("db", "mysql", "client"): 1}
    run = Run(RULES)
    run.login()
    run.session.end()  # a clean end
    assert run.counts("decode_errors") == {}
