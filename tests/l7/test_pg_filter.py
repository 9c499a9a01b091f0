"""The session filter's fast paths (whole chunks of common messages handled without message
objects, and decisions remembered per session) against its general path: the same streams
fed whole and fed one byte at a time (which never takes a fast path) must write the same
bytes to both sides and count the same."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from l7.pg_filter import PgSession
from l7.policy import PolicyEngine
from l7.policy_config import PolicyConfig
from l7.sql_context import SqlContext
from router.sql_metrics import CLAIMED_APPS_MAX, OTHER_APPS, SqlStats


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def startup() -> bytes:
    body = struct.pack("!I", 196608) + cstr("user") + cstr("alice") + cstr("database") + cstr("db") + b"\0"
    return struct.pack("!I", len(body) + 4) + body


RULES: list[dict[str, Any]] = [
    {"name": "no-drop", "match": {"verbs": ["DROP", "TRUNCATE"]}, "action": "deny"},
    {"name": "watch-audit", "match": {"tables": ["audit"]}, "action": "log"},
    {"name": "slow-limited", "match": {"tables": ["limited"]}, "action": {"rate_limit": "1/m", "over": "deny"}},
]


class Hooks:
    def connect_upstream(self) -> None:
        pass

    def start_tls(self) -> None:
        pass

    def cancel(self, pid: int, secret: bytes, raw: bytes) -> None:
        pass

    def backend_key(self, pid: int, secret: bytes) -> None:
        pass

    def pause(self, seconds: float) -> None:
        pass

    def close(self, reason: str) -> None:
        pass


def row(value: bytes = b"1") -> bytes:
    return msg(b"D", struct.pack("!HI", 1, len(value)) + value)


ROWDESC = msg(b"T", b"\0\1x\0" + b"\0" * 18)


def ready(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def done(tag: str) -> bytes:
    return msg(b"C", cstr(tag))


def query(sql: str) -> bytes:
    return msg(b"Q", cstr(sql))


def parse(name: str, sql: str) -> bytes:
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack("!H", 0))


def bind(stmt: str, value: bytes = b"7", portal: str = "") -> bytes:
    params = struct.pack("!HHHI", 0, 1, 0, len(value))[2:] + value  # no formats, one value
    return msg(b"B", cstr(portal) + cstr(stmt) + params + struct.pack("!H", 0))


def execute(portal: str = "") -> bytes:
    return msg(b"E", cstr(portal) + struct.pack("!i", 0))


def describe(kind: bytes = b"P", name: str = "") -> bytes:
    return msg(b"D", kind + cstr(name))


SYNC = msg(b"S")
DENIED = msg(b"E", cstr("SERROR") + cstr("C42501") + cstr("Mdenied") + b"\0")


def exchange() -> list[tuple[str, bytes]]:
    """(side, chunk) in order; the server's answers are what PostgreSQL would send."""
    ok = row() + done("SELECT 1")
    run = bind("P_0") + describe() + execute() + SYNC
    out: list[tuple[str, bytes]] = [
        ("c", startup()),
        ("s", msg(b"R", struct.pack("!i", 0)) + msg(b"K", struct.pack("!i", 42) + b"abcd") + ready()),
    ]
    for i in range(3):  # literals differ: one skeleton, one remembered decision
        out += [("c", query(f"SELECT x FROM t WHERE id = {i}")), ("s", ROWDESC + ok + ready())]
    out += [("c", query("BEGIN")), ("s", done("BEGIN") + ready(b"T"))]
    out += [("c", query("SELECT x FROM audit WHERE id = 1")), ("s", ROWDESC + ok + ready(b"T"))]
    out += [("c", query("SELECT x FROM audit WHERE id = 2")), ("s", ROWDESC + ok + ready(b"T"))]
    out += [("c", query("COMMIT")), ("s", done("COMMIT") + ready())]
    out += [("c", query("DROP TABLE t")), ("s", DENIED + ready())]
    # pgbench -M prepared: Parse once, then Bind/Describe/Execute/Sync per transaction
    out += [("c", parse("P_0", "SELECT x FROM t WHERE id = $1") + run)]
    out += [("s", msg(b"1") + msg(b"2") + ROWDESC + ok + ready())]
    for _ in range(3):
        out += [("c", run), ("s", msg(b"2") + ROWDESC + ok + ready())]
    # pipelined: two runs in one chunk
    out += [("c", run + run), ("s", (msg(b"2") + ROWDESC + ok + ready()) * 2)]
    # the same name re-parsed as a rate-limited statement: the first Execute takes the
    # bucket's one token, the second is refused (the remembered allow must be forgotten)
    limited = bind("P_0") + execute() + SYNC
    out += [("c", msg(b"C", b"S" + cstr("P_0")) + SYNC), ("s", msg(b"3") + ready())]
    out += [("c", parse("P_0", "SELECT x FROM limited WHERE id = $1") + limited)]
    out += [("s", msg(b"1") + msg(b"2") + ok + ready())]
    out += [("c", limited), ("s", DENIED + ready())]
    # the unnamed statement, re-parsed without a Close (as drivers do)
    unnamed = bind("") + execute() + SYNC
    out += [("c", parse("", "SELECT x FROM t WHERE id = $1") + unnamed), ("s", msg(b"1") + msg(b"2") + ok + ready())]
    out += [("c", unnamed), ("s", msg(b"2") + ok + ready())]
    out += [("c", parse("", "SELECT y FROM limited WHERE id = $1") + SYNC), ("s", msg(b"1") + ready())]
    out += [("c", unnamed), ("s", DENIED + ready())]
    # a statement logged at every Execute is never remembered
    out += [("c", parse("A", "SELECT x FROM audit WHERE id = $1") + SYNC), ("s", msg(b"1") + ready())]
    for _ in range(2):
        out += [("c", bind("A") + execute() + SYNC), ("s", msg(b"2") + ok + ready())]
    # a Describe of a statement, and an Execute of a statement never parsed here: what it does
    # cannot be known and an enforcing rule covers the session, so it is refused (fail closed)
    out += [("c", describe(b"S", "A") + SYNC), ("s", msg(b"t", b"\0\0") + msg(b"n") + ready())]
    out += [("c", bind("nope") + execute() + SYNC), ("s", DENIED + ready())]
    out += [("c", msg(b"X")), ("s", b"")]
    return out


def run_session(split: bool) -> tuple[bytes, bytes, SqlStats]:
    stats = SqlStats()
    engine = PolicyEngine(PolicyConfig.model_validate({"policies": RULES}))
    ctx = SqlContext("db", stats, stats.classifier, stats.classifier_bs, engine=engine)
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    session = PgSession(lambda: ctx, to_server.append, to_client.append, Hooks(), "127.0.0.1")
    for side, chunk in exchange():
        feed = session.from_client if side == "c" else session.from_server
        if split:
            for i in range(len(chunk)):
                feed(chunk[i : i + 1])
        elif chunk:
            feed(chunk)
    return b"".join(to_server), b"".join(to_client), stats


def test_fast_paths_write_and_count_as_the_general_path() -> None:
    fast_server, fast_client, fast = run_session(split=False)
    slow_server, slow_client, slow = run_session(split=True)
    assert fast_server == slow_server
    assert fast_client == slow_client
    for name in ("statements", "denied", "errors", "transactions", "sessions", "policy_matches", "decode_errors"):
        assert dict(getattr(fast, name).values) == dict(getattr(slow, name).values), name
    assert fast.durations.series == slow.durations.series
    denied = {key[-1]: value for key, value in fast.denied.values.items()}
    assert denied == {"no-drop": 2, "slow-limited": 2}  # the second no-drop: the unknown statement
    assert fast.policy_matches.values[("watch-audit", "log")] == 5  # 2 queries, the Parse, 2 Executes
    statements = {key[-1]: value for key, value in fast.statements.values.items()}
    assert statements == {"SELECT": 16, "BEGIN": 1, "COMMIT": 1}  # refused: not sent, not counted


@pytest.mark.parametrize("split", [False, True])
def test_remembered_execute_is_forwarded_whole(split: bool) -> None:
    server, _, _ = run_session(split)
    run = bind("P_0") + describe() + execute() + SYNC
    assert (run + run) in server


def test_apps_clients_name_themselves_are_bounded_as_labels_not_for_policy() -> None:
    """A client can claim any application_name: past CLAIMED_APPS_MAX distinct ones the `app`
    label is OTHER_APPS, so /metrics stays bounded; the policy still sees the name claimed
    (a rule for one app cannot be dodged by flooding names first)."""
    stats = SqlStats()
    rule = {"name": "late-no-drop", "match": {"apps": ["late"], "verbs": ["DROP"]}, "action": "deny"}
    engine = PolicyEngine(PolicyConfig.model_validate({"policies": [rule]}))
    ctx = SqlContext("db", stats, stats.classifier, stats.classifier_bs, engine=engine)

    def session(app: str) -> tuple[PgSession, list[bytes]]:
        to_server: list[bytes] = []
        s = PgSession(lambda: ctx, to_server.append, lambda _: None, Hooks(), "127.0.0.1")
        body = struct.pack("!I", 196608) + cstr("user") + cstr("alice") + cstr("application_name") + cstr(app) + b"\0"
        s.from_client(struct.pack("!I", len(body) + 4) + body)
        s.from_server(msg(b"R", struct.pack("!I", 0)) + ready())
        return s, to_server

    for i in range(CLAIMED_APPS_MAX):
        session(f"app-{i}")[0].end()
    late, sent = session("late")
    assert late.app == "late" and late.who[2] == OTHER_APPS
    late.from_client(query("DROP TABLE t"))
    assert b"RAISE EXCEPTION" in sent[-1]  # refused: the rule saw app "late"
    assert stats.denied.values == {("db", "postgres", OTHER_APPS, "", "", "", "late-no-drop"): 1}
    apps = {key[2] for key in stats.sessions.values}
    assert len(apps) == CLAIMED_APPS_MAX + 1 and "app-0" in apps and OTHER_APPS in apps
    # A name seen before the bound keeps its label.
    assert session("app-7")[0].who[2] == "app-7"
