"""The mysql listener end to end, what it counts and enforces: a real MariaDB behind it, real
clients in front of it (PyMySQL, aiomysql, the mariadb CLI, mysqlslap, a raw-socket client for
the binary protocol). Counting, identity, policy and evasions; protocol coverage, bad input and
TLS are in test_mysql_protocol.py."""

from __future__ import annotations

import asyncio
import struct
import time

import aiomysql
import pymysql
import pymysql.cursors
import pytest

from tests.l7.mysql_clients import (
    CLIENT_DEPRECATE_EOF,
    COM_STMT_EXECUTE,
    COM_STMT_FETCH,
    DENY_DESTRUCTIVE,
    ER_TABLEACCESS_DENIED,
    ER_USER_LIMIT_REACHED,
    MULTI,
    SERVER_STATUS_CURSOR_EXISTS,
    SERVER_STATUS_LAST_ROW_SENT,
    Err,
    Ok,
    RawClient,
    _cli,
    _close,
    _connect,
    _count,
    _exec,
    _exists,
    _lenenc,
    _name,
    _refused,
    _run,
    _run_sync,
    _sql,
    _total,
)
from tests.l7.mysql_helpers import proxied_mysql
from tests.mysqlserver import (
    APP_USER,
    DATABASE,
    NOPASS_USER,
    SUPERUSER,
    MySqlServer,
)
from tests.support import wait_until

# --- 1. counting ---------------------------------------------------------------------------------------------


async def test_pymysql_workload_counts_exactly_per_verb_and_transaction(mysql_server: MySqlServer, table: str) -> None:
    n_insert, n_update, n_select, n_delete = 7, 3, 5, 2
    async with proxied_mysql(mysql_server) as proxy:
        conn = await _connect(proxy, program_name="workload", autocommit=True)  # sends SET NAMES only
        try:
            for i in range(n_insert):
                await _run(conn, f"INSERT INTO {table} (a) VALUES (%s)", (100 + i,))
            for i in range(n_update):
                await _run(conn, f"UPDATE {table} SET a = a + 1000 WHERE a = %s", (100 + i,))
            for _ in range(n_select):
                assert await _run(conn, f"SELECT COUNT(*) FROM {table}") == [(3 + n_insert,)]
            for i in range(n_delete):
                await _run(conn, f"DELETE FROM {table} WHERE a = %s", (1 + i,))
            # An explicit transaction that commits ...
            await asyncio.to_thread(conn.begin)
            await _run(conn, f"INSERT INTO {table} (a) VALUES (500)")
            await _run(conn, f"INSERT INTO {table} (a) VALUES (501)")
            await asyncio.to_thread(conn.commit)
            # ... and one that rolls back.
            await asyncio.to_thread(conn.begin)
            await _run(conn, f"INSERT INTO {table} (a) VALUES (600)")
            await _run(conn, f"DELETE FROM {table} WHERE a = 3")
            await asyncio.to_thread(conn.rollback)
        finally:
            await _close(conn)
        # autocommit off (PyMySQL sends SET AUTOCOMMIT = 0): the INSERT starts a transaction by itself.
        conn = await _connect(proxy, program_name="workload", autocommit=False)
        try:
            await _run(conn, f"INSERT INTO {table} (a) VALUES (700)")
            await asyncio.to_thread(conn.commit)
        finally:
            await _close(conn)

        expected = {
            "INSERT": n_insert + 2 + 1 + 1,
            "UPDATE": n_update,
            "SELECT": n_select,
            "DELETE": n_delete + 1,
            "BEGIN": 2,
            "COMMIT": 2,
            "ROLLBACK": 1,
            "SET": 3,  # PyMySQL's SET NAMES on each connection, and the second one's SET AUTOCOMMIT = 0
        }
        for verb, count in expected.items():
            assert _total(proxy, app="workload", verb=verb, database=DATABASE) == count, verb
        assert _total(proxy) == sum(expected.values())  # nothing else was counted, nothing twice
        assert _total(proxy, protocol="mysql", listener="db") == sum(expected.values())
        assert proxy.counter("transactions", app="workload", outcome="committed") == 2
        assert proxy.counter("transactions", app="workload", outcome="rolled_back") == 1
        assert proxy.counter("denied") == 0
        assert proxy.counter("errors") == 0
        # Every statement got a latency: the histogram saw as many as were counted.
        durations = proxy.router.sql_stats.durations
        for verb, count in expected.items():
            assert durations.count(("db", "mysql", "workload", "", "", "", verb)) == count, verb
        assert proxy.counter("sessions", app="workload") == 2
        await wait_until(lambda: proxy.counter("active") == 0, what="sessions to end")
    # The server saw exactly that: 3 + 7 - 2 + 2 (committed) + 1 (autocommit off, committed).
    assert await _count(mysql_server, table) == 3 + n_insert - n_delete + 2 + 1
    assert await _count(mysql_server, table, "WHERE a = 600") == 0


def _com_status(text: str) -> dict[str, int]:
    return {name: int(value) for name, value in (line.split("\t") for line in text.strip().splitlines())}


async def test_mysqlslap_counts_exactly(mysql_server: MySqlServer) -> None:
    clients, iterations = 4, 3
    schema = _name("slap")
    status = (
        "SHOW GLOBAL STATUS WHERE variable_name IN "
        "('Com_insert', 'Com_select', 'Com_update', 'Com_create_table', 'Com_create_db', 'Com_drop_db')"
    )
    rule = {"name": "no-truncate", "match": {"verbs": ["TRUNCATE"]}, "action": "deny"}  # decode, enforce
    async with proxied_mysql(mysql_server, [rule]) as proxy:
        before = _com_status(await _sql(mysql_server, status))
        code, out, err = await _exec(
            "mysqlslap", "--no-defaults", "--protocol=TCP", "-h", "127.0.0.1", "-P", str(proxy.port),
            "-u", SUPERUSER, f"--create-schema={schema}", f"--concurrency={clients}", f"--iterations={iterations}",
            "--create=CREATE TABLE t1 (id INT AUTO_INCREMENT PRIMARY KEY, a INT)",
            "--query=INSERT INTO t1 (a) VALUES (1);SELECT COUNT(*) FROM t1;UPDATE t1 SET a = a + 1",
            "--delimiter=;",
        )  # fmt: skip
        assert code == 0, out + err
        after = _com_status(await _sql(mysql_server, status))
        runs = clients * iterations
        # mysqlslap: DROP SCHEMA IF EXISTS once, then per iteration CREATE SCHEMA, CREATE TABLE,
        # every client's three queries, DROP SCHEMA. Its setup connection says program_name
        # mysqlslap; the clients' connections send no program_name: they count as their user.
        assert _total(proxy, app=SUPERUSER, verb="INSERT", database=schema) == runs
        assert _total(proxy, app=SUPERUSER, verb="SELECT", database=schema) == runs
        assert _total(proxy, app=SUPERUSER, verb="UPDATE", database=schema) == runs
        assert _total(proxy, app="mysqlslap", verb="CREATE") == 2 * iterations
        assert _total(proxy, app="mysqlslap", verb="DROP") == 1 + iterations
        assert _total(proxy) == 3 * runs + 3 * iterations + 1
        # The server's own counters agree with the proxy's.
        delta = {k: after[k] - before[k] for k in after}
        assert delta["Com_insert"] == delta["Com_select"] == delta["Com_update"] == runs
        assert delta["Com_create_table"] == iterations
        assert delta["Com_create_db"] == iterations and delta["Com_drop_db"] == 1 + iterations
        assert proxy.counter("sessions", app="mysqlslap") == 1
        assert proxy.counter("sessions", app=SUPERUSER) == runs
        assert proxy.counter("denied") == 0
        await wait_until(lambda: proxy.counter("active") == 0, what="mysqlslap's sessions to end")


# --- 2. identity -------------------------------------------------------------------------------------------


async def test_identity_listener_app_then_program_name_then_user(mysql_server: MySqlServer) -> None:
    async with proxied_mysql(mysql_server, app="orders") as fixed:
        conn = await _connect(fixed, program_name="something-else", autocommit=True)
        await _run(conn, "SELECT 1")
        await _close(conn)
        code, _, err = await _cli(fixed, "SELECT 1")
        assert code == 0, err
        assert _total(fixed, app="orders", verb="SELECT") == 2
        assert _total(fixed, verb="SELECT") == 2
        assert _total(fixed) == _total(fixed, app="orders")
        assert fixed.counter("sessions", app="orders") == 2
    async with proxied_mysql(mysql_server) as proxy:
        conn = await _connect(proxy, program_name="billing", autocommit=True)
        await _run(conn, "SELECT 1")
        await _close(conn)
        conn = await _connect(proxy, autocommit=True)  # no program_name: the user
        await _run(conn, "SELECT 1")
        await _close(conn)
        conn = await _connect(proxy, user=NOPASS_USER, password=None, autocommit=True)
        await _run(conn, "SELECT 1")
        await _close(conn)
        code, out, err = await _cli(proxy, "SELECT 2")  # the CLI's own program_name
        assert (code, out.strip()) == (0, "2"), err
        assert _total(proxy, app="billing", verb="SELECT") == 1
        assert _total(proxy, app=APP_USER, verb="SELECT") == 1
        assert _total(proxy, app=NOPASS_USER, verb="SELECT") == 1
        assert _total(proxy, app="mysql", verb="SELECT") == 1
        assert proxy.counter("sessions") == 4
        await wait_until(lambda: proxy.counter("active") == 0, what="sessions to end")


async def test_listener_identity_labels_every_series(mysql_server: MySqlServer, table: str) -> None:
    identity = {"app": "billing", "version": "1.4.2", "instance": "billing-7", "node": "n3"}
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE], identity=identity) as proxy:
        conn = await _connect(proxy, program_name="ignored", autocommit=True)
        try:
            await _run(conn, f"SELECT * FROM {table}")
            error = await _refused(conn, f"DELETE FROM {table}")
            assert error.args[0] == ER_TABLEACCESS_DENIED
        finally:
            await _close(conn)
        assert _total(proxy, **identity, verb="SELECT", database=DATABASE) == 1
        assert proxy.counter("denied", **identity, rule="no-destructive") == 1
        assert proxy.counter("sessions", **identity) == 1
        assert _total(proxy, app="ignored") == 0


# --- 3. policy ---------------------------------------------------------------------------------------------


async def test_drop_denied_from_the_cli_names_the_rule(mysql_server: MySqlServer, table: str) -> None:
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        code, out, err = await _cli(proxy, f"SELECT COUNT(*) FROM {table}; DROP TABLE {table}; SELECT 99")
        assert code != 0
        assert out.strip() == "3"  # the statement before ran, the one after did not (batch mode stops)
        assert f"ERROR {ER_TABLEACCESS_DENIED} (42000)" in err, err
        assert "no-destructive" in err, err
        assert proxy.counter("denied", rule="no-destructive", app="mysql") == 1
        assert proxy.counter("errors", app="mysql", sqlstate_class="42") == 1
        assert _total(proxy, verb="DROP") == 0
        # --force (statements on stdin): the CLI goes on after the refusal, on the same connection.
        script = f"DROP TABLE {table};\nSELECT 42;\n".encode()
        code, out, err = await _exec(*proxy.client_args(), "--batch", "--skip-column-names", "--force", stdin=script)
        assert out.strip() == "42" and "no-destructive" in err, (out, err)
        assert proxy.counter("sessions", app="mysql") == 2
    assert await _exists(mysql_server, table)


async def test_drop_denied_from_pymysql_and_the_transaction_survives(mysql_server: MySqlServer, table: str) -> None:
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await _connect(proxy, program_name="victim", autocommit=True)
        try:
            error = await _refused(conn, f"DROP TABLE {table}")
            assert isinstance(error, pymysql.err.OperationalError | pymysql.err.ProgrammingError)
            assert error.args[0] == ER_TABLEACCESS_DENIED
            assert "no-destructive" in error.args[1]
            assert await _run(conn, "SELECT 7") == [(7,)]
            await asyncio.to_thread(conn.begin)
            await _run(conn, f"INSERT INTO {table} (a) VALUES (40)")
            error = await _refused(conn, f"DROP TABLE {table}")
            assert error.args[0] == ER_TABLEACCESS_DENIED
            # A DROP that reached the server would have committed implicitly; the refused one did
            # not: the INSERT is still uncommitted, invisible from another session ...
            assert await _count(mysql_server, table) == 3
            assert await _run(conn, f"SELECT COUNT(*) FROM {table}") == [(4,)]  # ... but visible in its own
            await asyncio.to_thread(conn.commit)
        finally:
            await _close(conn)
        assert await _count(mysql_server, table) == 4
        assert proxy.counter("denied", app="victim", rule="no-destructive") == 2
        assert proxy.counter("transactions", app="victim", outcome="committed") == 1


async def test_drop_denied_from_aiomysql(mysql_server: MySqlServer, table: str) -> None:
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        kwargs = proxy.connect_kwargs(program_name="aio", autocommit=True)
        kwargs["db"] = kwargs.pop("database")
        conn = await aiomysql.connect(**kwargs)
        try:
            async with conn.cursor() as cur:
                with pytest.raises(pymysql.err.MySQLError) as info:
                    await cur.execute(f"DROP TABLE {table}")
                assert info.value.args[0] == ER_TABLEACCESS_DENIED
                assert "no-destructive" in info.value.args[1]
                await cur.execute(f"SELECT COUNT(*) FROM {table}")
                assert await cur.fetchone() == (3,)
        finally:
            conn.close()
        assert proxy.counter("denied", app="aio") == 1
        assert _total(proxy, app="aio", verb="SELECT") == 1
    assert await _exists(mysql_server, table)


async def test_sqlstate_of_a_refusal_on_the_wire(mysql_server: MySqlServer, table: str) -> None:
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        client = await RawClient.login(proxy.port)
        try:
            answer = await client.query(f"DELETE FROM {table}")
            assert isinstance(answer, Err), answer
            assert (answer.code, answer.sqlstate) == (ER_TABLEACCESS_DENIED, "42000")
            assert "no-destructive" in answer.message
            assert await client.scalar("SELECT 5") == b"5"
        finally:
            await client.close()


async def test_multi_statement_string_with_one_denied_statement_runs_none(
    mysql_server: MySqlServer, table: str
) -> None:
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await _connect(proxy, program_name="multi", client_flag=MULTI, autocommit=True)
        try:
            # Allowed strings count every statement in them.
            rows = await _run(
                conn, f"INSERT INTO {table} (a) VALUES (10); INSERT INTO {table} (a) VALUES (11); SELECT 8"
            )
            assert rows == [(8,)]
            error = await _refused(
                conn, f"INSERT INTO {table} (a) VALUES (12); UPDATE {table} SET a = 0; DELETE FROM {table}; SELECT 9"
            )
            assert error.args[0] == ER_TABLEACCESS_DENIED and "no-destructive" in error.args[1]
            assert await _run(conn, "SELECT 7") == [(7,)]  # the connection is in sync
        finally:
            await _close(conn)
        assert await _count(mysql_server, table) == 5  # 3 + 2: neither 12 nor the UPDATE ran
        assert await _count(mysql_server, table, "WHERE a = 0") == 0
        assert _total(proxy, app="multi", verb="INSERT") == 2
        assert _total(proxy, app="multi", verb="UPDATE") == 0
        assert _total(proxy, app="multi", verb="SELECT") == 2
        assert proxy.counter("denied", app="multi", rule="no-destructive") == 1


async def test_sql_prepare_execute_is_counted_and_denied_as_what_was_prepared(
    mysql_server: MySqlServer, table: str
) -> None:
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        sql = f"PREPARE i FROM 'INSERT INTO {table} (a) VALUES (9)'; EXECUTE i; EXECUTE i; DEALLOCATE PREPARE i"
        code, _, err = await _cli(proxy, sql)
        assert code == 0, err
        assert _total(proxy, app="mysql", verb="INSERT") == 2  # each EXECUTE is the INSERT it runs
        assert _total(proxy, app="mysql", verb="PREPARE") == 1
        code, _, err = await _cli(proxy, f"PREPARE d FROM 'DELETE FROM {table}'; EXECUTE d")
        assert code != 0 and "no-destructive" in err, err
        assert f"ERROR {ER_TABLEACCESS_DENIED}" in err
        assert proxy.counter("denied", app="mysql", rule="no-destructive") == 1
    assert await _count(mysql_server, table) == 5


@pytest.mark.parametrize(
    "sql",
    [
        "SET @q = 'DELETE FROM {t}'; PREPARE s FROM @q; EXECUTE s",
        "SET @q = CONCAT('DEL', 'ETE FROM {t}'); PREPARE s FROM @q; EXECUTE s",
        "SET @q = 'DELETE FROM {t}';\nPREPARE s FROM @q;\nEXECUTE s;",  # one statement per COM_QUERY
    ],
)
async def test_prepare_from_a_user_variable_is_no_blind_spot(mysql_server: MySqlServer, table: str, sql: str) -> None:
    """``PREPARE s FROM @q``: the text is in a variable the proxy may never have seen whole
    (CONCAT). Whether it refuses the PREPARE or the EXECUTE, the DELETE must not run."""
    sql = sql.format(t=table)
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        if "\n" in sql:
            code, _, err = await _exec(*proxy.client_args(), "--batch", stdin=sql.encode())
            assert code != 0 and "no-destructive" in err, err
        else:
            conn = await _connect(proxy, program_name="var", client_flag=MULTI, autocommit=True)
            try:
                error = await _refused(conn, sql)
                assert error.args[0] == ER_TABLEACCESS_DENIED and "no-destructive" in error.args[1], error
                assert await _run(conn, "SELECT 7") == [(7,)]
            finally:
                await _close(conn)
    assert await _count(mysql_server, table) == 3


async def test_binary_protocol_prepare_execute(mysql_server: MySqlServer, table: str) -> None:
    """COM_STMT_PREPARE / COM_STMT_EXECUTE, which neither PyMySQL nor aiomysql send."""
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        client = await RawClient.login(proxy.port)
        try:
            prepared = await client.prepare(f"INSERT INTO {table} (a) VALUES (?)")
            assert not isinstance(prepared, Err), prepared
            insert, _, params = prepared
            assert params == 1
            for value in (20, 21, 22):
                assert isinstance(await client.execute(insert, [value]), Ok)
            client.close_statement(insert)
            # DELETE: refused at PREPARE, or at the EXECUTE of what was prepared; never run.
            refusals = []
            prepared = await client.prepare(f"DELETE FROM {table} WHERE a > ?")
            if isinstance(prepared, Err):
                refusals.append(prepared)
            else:
                answer = await client.execute(prepared[0], [0])
                assert isinstance(answer, Err), answer
                refusals.append(answer)
            assert [(e.code, e.sqlstate) for e in refusals] == [(ER_TABLEACCESS_DENIED, "42000")]
            assert "no-destructive" in refusals[0].message
            # Still in sync: a prepared SELECT returns its one row, a text query works.
            prepared = await client.prepare(f"SELECT a FROM {table} WHERE a = ?")
            assert not isinstance(prepared, Err), prepared
            rows = await client.execute(prepared[0], [21])
            assert isinstance(rows, list) and len(rows) == 1, rows
            assert await client.scalar(f"SELECT COUNT(*) FROM {table}") == b"6"
        finally:
            await client.close()
        assert _total(proxy, app=APP_USER, verb="INSERT") == 3
        assert proxy.counter("denied", app=APP_USER, rule="no-destructive") == 1
    assert await _count(mysql_server, table) == 6


def _end_status(packet: bytes, deprecate_eof: bool) -> int:
    """The status flags of a result's end: an EOF packet (0xFE, warnings, status) or, with
    CLIENT_DEPRECATE_EOF, an OK packet with the 0xFE header (affected rows, insert id, status)."""
    assert packet[0] == 0xFE and len(packet) < 0xFFFFFF, packet
    if not deprecate_eof:
        return int(struct.unpack_from("<H", packet, 3)[0])
    _, at = _lenenc(packet, 1)
    _, at = _lenenc(packet, at)
    return int(struct.unpack_from("<H", packet, at)[0])


@pytest.mark.parametrize("deprecate_eof", [False, True], ids=["eof", "deprecate-eof"])
async def test_binary_protocol_cursor_fetch(mysql_server: MySqlServer, table: str, deprecate_eof: bool) -> None:
    """COM_STMT_EXECUTE opening a read-only cursor, then COM_STMT_FETCH two rows at a time:
    the answers are followed to their ends, the session stays in step, the SELECT counts once."""
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        extra = CLIENT_DEPRECATE_EOF if deprecate_eof else 0
        client = await RawClient.login(proxy.port, extra_capabilities=extra)
        try:
            prepared = await client.prepare(f"SELECT a FROM {table} ORDER BY a")
            assert not isinstance(prepared, Err), prepared
            statement, columns, _ = prepared
            client.send(struct.pack("<BIBI", COM_STMT_EXECUTE, statement, 1, 1), 0)  # CURSOR_TYPE_READ_ONLY
            first = await client.read()
            assert _lenenc(first, 0)[0] == columns == 1, first
            for _ in range(columns):
                await client.read()
            opened = await client.read()  # no rows yet: they come with COM_STMT_FETCH
            assert _end_status(opened, deprecate_eof) & SERVER_STATUS_CURSOR_EXISTS, opened
            fetched: list[bytes] = []
            for _ in range(5):
                client.send(struct.pack("<BII", COM_STMT_FETCH, statement, 2), 0)
                while (packet := await client.read())[0] != 0xFE:
                    fetched.append(packet)
                if _end_status(packet, deprecate_eof) & SERVER_STATUS_LAST_ROW_SENT:
                    break
            assert len(fetched) == 3, fetched  # the table's three rows, as binary rows
            assert all(row[0] == 0x00 for row in fetched)
            assert await client.scalar(f"SELECT COUNT(*) FROM {table}") == b"3"
        finally:
            await client.close()
        assert _total(proxy, app=APP_USER, verb="SELECT") == 2  # the cursor's and the COUNT
        assert proxy.counter("decode_errors") == 0


async def test_statements_prepared_before_the_policy_are_denied_at_execute(
    mysql_server: MySqlServer, table: str
) -> None:
    """Both kinds of prepared statement, prepared (and run once) while no rule applied: after
    the reload their EXECUTE is refused, on the same session."""
    async with proxied_mysql(mysql_server) as proxy:
        client = await RawClient.login(proxy.port)
        try:
            prepared = await client.prepare(f"DELETE FROM {table} WHERE a = ?")
            assert not isinstance(prepared, Err), prepared
            assert isinstance(await client.execute(prepared[0], [1]), Ok)  # allowed: no policy yet
            assert isinstance(await client.query(f"PREPARE d FROM 'DELETE FROM {table} WHERE a = 2'"), Ok)
            await proxy.apply([DENY_DESTRUCTIVE])
            answer = await client.execute(prepared[0], [3])
            assert isinstance(answer, Err) and answer.code == ER_TABLEACCESS_DENIED, answer
            answer = await client.query("EXECUTE d")
            assert isinstance(answer, Err) and answer.code == ER_TABLEACCESS_DENIED, answer
            assert await client.scalar(f"SELECT COUNT(*) FROM {table}") == b"2"
        finally:
            await client.close()
        assert proxy.counter("denied", app=APP_USER, rule="no-destructive") == 2
        assert _total(proxy, app=APP_USER, verb="DELETE") == 1
    assert await _count(mysql_server, table) == 2


async def test_rate_limit_over_deny_refuses_with_1226(mysql_server: MySqlServer, table: str) -> None:
    rule = {
        "name": "cap-inserts",
        "match": {"verbs": ["INSERT"], "apps": ["capped"]},
        "action": {"rate_limit": "5/s", "burst": 5, "over": "deny"},
    }
    async with proxied_mysql(mysql_server, [rule]) as proxy:
        conn = await _connect(proxy, program_name="capped", autocommit=True)

        def hammer() -> list[int]:
            codes = []
            for i in range(20):
                try:
                    _run_sync(conn, f"INSERT INTO {table} (a) VALUES (%s)", (1000 + i,))
                    codes.append(0)
                except pymysql.err.MySQLError as exc:
                    codes.append(exc.args[0])
            return codes

        try:
            codes = await asyncio.to_thread(hammer)
            assert await _run(conn, "SELECT 1") == [(1,)]
        finally:
            await _close(conn)
        refused = codes.count(ER_USER_LIMIT_REACHED)
        assert set(codes) <= {0, ER_USER_LIMIT_REACHED}, codes
        inserted = await _count(mysql_server, table, "WHERE a >= 1000")
        assert inserted + refused == 20 and inserted == codes.count(0)
        assert 5 <= inserted <= 8, codes  # the burst, plus what refilled while the loop ran
        assert proxy.counter("denied", rule="cap-inserts", app="capped") == refused
        assert _total(proxy, verb="INSERT") == inserted


async def test_rate_limit_over_delay_holds_statements(mysql_server: MySqlServer, table: str) -> None:
    rule = {
        "name": "slow-inserts",
        "match": {"verbs": ["INSERT"]},
        "action": {"rate_limit": "5/s", "burst": 1, "over": "delay"},
    }
    async with proxied_mysql(mysql_server, [rule]) as proxy:
        conn = await _connect(proxy, program_name="slowed", autocommit=True)

        def six() -> float:
            started = time.monotonic()
            for i in range(6):
                _run_sync(conn, f"INSERT INTO {table} (a) VALUES (%s)", (2000 + i,))
            return time.monotonic() - started

        try:
            elapsed = await asyncio.to_thread(six)
            fast = time.monotonic()
            await _run(conn, "SELECT 1")  # other verbs are not held
            assert time.monotonic() - fast < 0.15
        finally:
            await _close(conn)
        assert elapsed >= 0.95, elapsed  # five inserts beyond the burst of one at 5/s
        assert await _count(mysql_server, table, "WHERE a >= 2000") == 6
        assert proxy.counter("delayed", rule="slow-inserts") >= 4
        assert proxy.counter("denied") == 0


async def test_log_and_dry_run_are_counted_never_enforced(
    mysql_server: MySqlServer, table: str, caplog: pytest.LogCaptureFixture
) -> None:
    rules = [
        {"name": "watch-ddl", "match": {"verbs": ["CREATE", "DROP"]}, "action": "log"},
        {"name": "rehearse", "match": {"verbs": ["DELETE"]}, "action": "dry_run"},
    ]
    scratch = _name()
    async with proxied_mysql(mysql_server, rules) as proxy:
        with caplog.at_level("INFO", logger="pointsman.sql.policy"):
            code, _, err = await _cli(
                proxy, f"DELETE FROM {table} WHERE a = 1; CREATE TABLE {scratch} (x INT); DROP TABLE {scratch}"
            )
        assert code == 0, err
        stats = proxy.router.sql_stats
        assert stats.policy_matches.get(("rehearse", "dry_run")) == 1
        assert stats.policy_matches.get(("watch-ddl", "log")) == 2
        assert proxy.counter("denied") == 0
        assert _total(proxy, verb="DELETE") == 1
    assert await _count(mysql_server, table) == 2  # the DELETE ran
    assert not await _exists(mysql_server, scratch)
    lines = [r.getMessage() for r in caplog.records if r.name == "pointsman.sql.policy"]
    assert any('"rule":"rehearse"' in line and '"verb":"DELETE"' in line for line in lines), lines
    assert any('"rule":"watch-ddl"' in line and scratch in line for line in lines), lines


async def test_policy_reload_applies_to_an_open_connection(mysql_server: MySqlServer, table: str) -> None:
    async with proxied_mysql(mysql_server) as proxy:
        conn = await _connect(proxy, program_name="long-lived", autocommit=True)
        try:
            await _run(conn, f"DELETE FROM {table} WHERE a = 1")  # allowed: no policy yet
            await proxy.apply([DENY_DESTRUCTIVE])
            error = await _refused(conn, f"DELETE FROM {table} WHERE a = 2")
            assert error.args[0] == ER_TABLEACCESS_DENIED and "no-destructive" in error.args[1]
            assert await _run(conn, "SELECT 3") == [(3,)]
            await proxy.apply([])
            await _run(conn, f"DELETE FROM {table} WHERE a = 3")  # lifted again
        finally:
            await _close(conn)
        assert proxy.counter("denied", app="long-lived") == 1
        assert proxy.counter("sessions", app="long-lived") == 1  # one connection throughout
    assert await _count(mysql_server, table) == 1  # only a = 2 is left


# --- 4. evasions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE {t}",
        "/* x */ DROP TABLE {t}",
        "-- c\nDROP TABLE {t}",
        "# c\nDROP TABLE {t}",
        "/*!50000 DROP TABLE {t} */",
        "/*!DROP TABLE {t}*/",
        "/*M!100000 DROP TABLE {t} */",
        "/*!50000 DROP */ TABLE {t}",
        "dRoP tAbLe {t}",
        " \t\n  DELETE FROM {t}",
        "DeLeTe/**/FROM {t}",
        "DELETE /*!99999 nothing here */ FROM {t}",
        "DELETE FROM `{t}`",
        "DELETE FROM test.{t}",
        "DELETE FROM `test`.`{t}`",
        "DELETE x FROM {t} AS x WHERE x.a > 0",
        "DROP TABLE IF EXISTS {t}",
        "TRUNCATE {t}",
        "TRUNCATE TABLE `{t}`",
        "SELECT 1; DROP TABLE {t}",
        "(SELECT 1) UNION (SELECT 2); DELETE FROM {t}",
        "SELECT 1;/* */DELETE FROM {t}",
        "PREPARE s FROM 'DELETE FROM {t}'; EXECUTE s",
        'PREPARE s FROM "DROP TABLE {t}"; EXECUTE s',
    ],
)
async def test_evasions_are_classified_and_denied(mysql_server: MySqlServer, table: str, sql: str) -> None:
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await _connect(proxy, program_name="evasion", client_flag=MULTI, autocommit=True)
        try:
            error = await _refused(conn, sql.format(t=table))
            assert error.args[0] == ER_TABLEACCESS_DENIED, error
            assert "no-destructive" in error.args[1]
            assert await _run(conn, "SELECT 7") == [(7,)]
        finally:
            await _close(conn)
        assert proxy.counter("denied", app="evasion", rule="no-destructive") == 1
    assert await _count(mysql_server, table) == 3


async def test_quoted_destructive_text_is_not_a_statement(mysql_server: MySqlServer, table: str) -> None:
    """Backslash escapes (the default sql_mode) keep a quote inside the string: one SELECT."""
    sql = f"SELECT 'a\\'; DROP TABLE {table}; -- '"
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await _connect(proxy, program_name="quoted", client_flag=MULTI, autocommit=True)
        try:
            assert await _run(conn, sql) == [(f"a'; DROP TABLE {table}; -- ",)]
            assert await _run(conn, f'SELECT "DELETE FROM {table}", `a` FROM {table} WHERE a = 1') == [
                (f"DELETE FROM {table}", 1)
            ]
        finally:
            await _close(conn)
        assert proxy.counter("denied") == 0
        assert _total(proxy, app="quoted", verb="SELECT") == 2
    assert await _count(mysql_server, table) == 3


async def test_no_backslash_escapes_mode_is_followed(mysql_server: MySqlServer, table: str) -> None:
    """With NO_BACKSLASH_ESCAPES the same bytes are a SELECT, a DROP and a comment: the proxy
    must lex them as the server will (the server reports the mode in every OK's status)."""
    sql = f"SELECT 'a\\'; DROP TABLE {table}; -- '"
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await _connect(proxy, program_name="nobs", client_flag=MULTI, autocommit=True)
        try:
            await _run(conn, "SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
            error = await _refused(conn, sql)
            assert error.args[0] == ER_TABLEACCESS_DENIED, error
            assert await _run(conn, "SELECT 7") == [(7,)]
        finally:
            await _close(conn)
        assert proxy.counter("denied", app="nobs") == 1
    assert await _exists(mysql_server, table)


async def test_tables_glob_matches_every_spelling_of_the_name(mysql_server: MySqlServer, table: str) -> None:
    secret = _name("secret")
    await _sql(mysql_server, f"CREATE TABLE {secret} (a INT); INSERT INTO {secret} VALUES (1), (2), (3);")
    rule = {"name": "protect-secrets", "match": {"verbs": ["DELETE"], "tables": ["secret_*"]}, "action": "deny"}
    try:
        async with proxied_mysql(mysql_server, [rule]) as proxy:
            conn = await _connect(proxy, program_name="globber", client_flag=MULTI, autocommit=True)
            try:
                for sql in (
                    f"DELETE FROM {secret}",
                    f"DELETE FROM `{secret}`",
                    f"DELETE FROM test.{secret}",
                    f"DELETE FROM `test`.`{secret}` WHERE a = 1",
                    f"delete from {secret.upper()}",  # names compare case-insensitively
                    f"DELETE s FROM {secret} s JOIN {table} t ON t.a = s.a",
                    f"DELETE FROM {table} WHERE a = 9; DELETE FROM {secret}",
                ):
                    error = await _refused(conn, sql)
                    assert error.args[0] == ER_TABLEACCESS_DENIED and "protect-secrets" in error.args[1], sql
                await _run(conn, f"DELETE FROM `{table}` WHERE a = 1")  # other tables: allowed
                await _run(conn, f"SELECT * FROM {secret}")  # other verbs: allowed
            finally:
                await _close(conn)
            assert proxy.counter("denied", rule="protect-secrets") == 7
            assert _total(proxy, app="globber", verb="DELETE") == 1
        assert await _count(mysql_server, secret) == 3
        assert await _count(mysql_server, table) == 2
    finally:
        await _sql(mysql_server, f"DROP TABLE IF EXISTS {secret}")
