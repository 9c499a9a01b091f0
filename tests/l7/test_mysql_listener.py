"""The mysql listener end to end: a real MariaDB behind it, real clients in front of it (PyMySQL,
aiomysql, the mariadb CLI, mysqlslap, and a hand-made client on a raw socket for what those do
not send: the binary protocol, COM_CHANGE_USER, malformed packets). Counting, identity, policy,
evasions, protocol coverage, bad input and TLS."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import ssl
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomysql
import pymysql
import pymysql.cursors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymysql.constants import CLIENT

from tests.l7.mysql_helpers import MySqlProxy, proxied_mysql
from tests.mysqlserver import (
    APP_PASSWORD,
    APP_USER,
    DATABASE,
    ED25519_PASSWORD,
    ED25519_USER,
    NOPASS_USER,
    SUPERUSER,
    MySqlServer,
    clean_env,
)
from tests.support import wait_until

DENY_DESTRUCTIVE: dict[str, Any] = {
    "name": "no-destructive",
    "match": {"verbs": ["DROP", "DELETE", "TRUNCATE"]},
    "action": "deny",
}
ER_TABLEACCESS_DENIED = 1142  # what a policy refusal looks like to a MySQL client
ER_USER_LIMIT_REACHED = 1226  # a rate limit over with deny
ER_ACCESS_DENIED = 1045  # a wrong password (the server's own answer)
MULTI = CLIENT.MULTI_STATEMENTS


# --- the server side: tables, checks straight on the server -------------------------------------------


def _name(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def _sql(server: MySqlServer, statements: str) -> str:
    """SQL as root over the server's own socket (never through the proxy)."""
    return await asyncio.to_thread(server.sql, statements, DATABASE)


async def _count(server: MySqlServer, table: str, where: str = "") -> int:
    return int((await _sql(server, f"SELECT COUNT(*) FROM {table} {where}")).strip())


async def _exists(server: MySqlServer, table: str) -> bool:
    where = f"table_schema = '{DATABASE}' AND table_name = '{table}'"
    out = await _sql(server, f"SELECT COUNT(*) FROM information_schema.tables WHERE {where}")
    return out.strip() == "1"


@pytest.fixture
async def table(mysql_server: MySqlServer) -> AsyncIterator[str]:
    """A fresh InnoDB table ``t_<random>(id auto, a int)`` in ``test`` holding a = 1, 2, 3."""
    name = _name()
    await _sql(
        mysql_server,
        f"CREATE TABLE {name} (id INT AUTO_INCREMENT PRIMARY KEY, a INT) ENGINE=InnoDB;"
        f"INSERT INTO {name} (a) VALUES (1), (2), (3);",
    )
    yield name
    await _sql(mysql_server, f"DROP TABLE IF EXISTS {name}")


# --- the client side -------------------------------------------------------------------------------


async def _connect(proxy: MySqlProxy, **kwargs: Any) -> pymysql.connections.Connection:
    """PyMySQL to the proxy, in a thread: the router runs in this test's loop. With socket
    timeouts: a thread stuck on a silent proxy would keep the loop from closing after a failure."""
    kwargs = {"connect_timeout": 10, "read_timeout": 30, "write_timeout": 30, **kwargs}
    return await asyncio.to_thread(pymysql.connect, **proxy.connect_kwargs(**kwargs))


def _run_sync(conn: pymysql.connections.Connection, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    """Execute, then read every result set (a multi-statement string has several); the rows of all."""
    with conn.cursor() as cur:
        cur.execute(sql, args)
        rows = list(cur.fetchall())
        while cur.nextset():
            rows += list(cur.fetchall())
    return rows


async def _run(conn: pymysql.connections.Connection, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    return await asyncio.to_thread(_run_sync, conn, sql, args)


async def _refused(conn: pymysql.connections.Connection, sql: str, args: Any = None) -> pymysql.err.MySQLError:
    """Run ``sql``, which must fail with a MySQL error; that error."""
    with pytest.raises(pymysql.err.MySQLError) as info:
        await _run(conn, sql, args)
    return info.value


async def _close(conn: pymysql.connections.Connection) -> None:
    await asyncio.to_thread(conn.close)


async def _exec(*args: str, timeout: float = 60.0, stdin: bytes | None = None) -> tuple[int, str, str]:
    """A client program (the mariadb CLI, mysqlslap) with a clean environment; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _cli(
    proxy: MySqlProxy, sql: str, user: str = APP_USER, password: str | None = APP_PASSWORD, *extra: str
) -> tuple[int, str, str]:
    """The mariadb CLI through the proxy, in batch mode (it stops at the first error)."""
    return await _exec(*proxy.client_args(user, password), "--batch", "--skip-column-names", *extra, "-e", sql)


def _total(proxy: MySqlProxy, **labels: str) -> float:
    return proxy.counter("statements", **labels)


# --- a hand-made client: the binary protocol, COM_CHANGE_USER and bad bytes ------------------------------

CLIENT_LONG_PASSWORD = 0x1
CLIENT_LONG_FLAG = 0x4
CLIENT_CONNECT_WITH_DB = 0x8
CLIENT_PROTOCOL_41 = 0x200
CLIENT_SSL = 0x800
CLIENT_TRANSACTIONS = 0x2000
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_PLUGIN_AUTH = 0x80000
CLIENT_DEPRECATE_EOF = 0x1000000
RAW_CAPABILITIES = (
    CLIENT_LONG_PASSWORD
    | CLIENT_LONG_FLAG
    | CLIENT_PROTOCOL_41
    | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | CLIENT_PLUGIN_AUTH
)
UTF8MB4_GENERAL_CI = 45
COM_QUIT, COM_INIT_DB, COM_QUERY, COM_PING, COM_CHANGE_USER = 0x01, 0x02, 0x03, 0x0E, 0x11
COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_STMT_CLOSE, COM_STMT_FETCH = 0x16, 0x17, 0x19, 0x1C
SERVER_STATUS_CURSOR_EXISTS, SERVER_STATUS_LAST_ROW_SENT = 0x40, 0x80


def native_password(password: str | None, salt: bytes) -> bytes:
    """mysql_native_password: SHA1(pw) XOR SHA1(salt + SHA1(SHA1(pw)))."""
    if not password:
        return b""
    h1 = hashlib.sha1(password.encode()).digest()
    h3 = hashlib.sha1(salt + hashlib.sha1(h1).digest()).digest()
    return bytes(a ^ b for a, b in zip(h1, h3, strict=True))


@dataclass(frozen=True)
class Err:
    code: int
    sqlstate: str
    message: str


@dataclass(frozen=True)
class Ok:
    payload: bytes


def _parse_err(payload: bytes) -> Err:
    code = int.from_bytes(payload[1:3], "little")
    if payload[3:4] == b"#":
        return Err(code, payload[4:9].decode(), payload[9:].decode(errors="replace"))
    return Err(code, "", payload[3:].decode(errors="replace"))


def _lenenc(data: bytes, at: int) -> tuple[int | None, int]:
    first = data[at]
    if first < 0xFB:
        return first, at + 1
    if first == 0xFB:
        return None, at + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}[first]
    return int.from_bytes(data[at + 1 : at + 1 + size], "little"), at + 1 + size


def _text_row(payload: bytes) -> list[bytes | None]:
    values: list[bytes | None] = []
    at = 0
    while at < len(payload):
        size, at = _lenenc(payload, at)
        if size is None:
            values.append(None)
        else:
            values.append(payload[at : at + size])
            at += size
    return values


Result = Err | Ok | list[bytes]


class RawClient:
    """Just enough of a MySQL client over a raw socket, to say what PyMySQL and the CLI never do."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: bytes) -> None:
        self.reader, self.writer, self.greeting = reader, writer, greeting
        self.seq = 0
        self.deprecate_eof = False  # no EOF after column definitions; results end in an OK
        assert greeting[0] == 10, greeting[:40]
        at = greeting.index(b"\0", 1) + 1 + 4  # server version, connection id
        salt1 = greeting[at : at + 8]
        at += 9
        low = int.from_bytes(greeting[at : at + 2], "little")
        at += 2 + 1 + 2  # capabilities (low), charset, status
        high = int.from_bytes(greeting[at : at + 2], "little")
        at += 2 + 1 + 10  # capabilities (high), auth data length, filler (MariaDB: + its own capabilities)
        self.capabilities = low | high << 16
        self.salt = salt1 + greeting[at : at + 12]

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        header = await asyncio.wait_for(reader.readexactly(4), 5.0)
        greeting = await reader.readexactly(int.from_bytes(header[:3], "little"))
        return cls(reader, writer, greeting)

    @classmethod
    async def login(
        cls,
        port: int,
        user: str = APP_USER,
        password: str | None = APP_PASSWORD,
        database: str | None = DATABASE,
        extra_capabilities: int = 0,
    ) -> RawClient:
        client = await cls.open(port)
        answer = await client.authenticate(user, password, database, extra_capabilities)
        assert isinstance(answer, Ok), answer
        return client

    def send(self, payload: bytes, seq: int = 0) -> None:
        """One packet (split at 16 MiB - 1 like any client)."""
        while True:
            chunk, payload = payload[:0xFFFFFF], payload[0xFFFFFF:]
            self.writer.write(len(chunk).to_bytes(3, "little") + bytes([seq & 0xFF]) + chunk)
            seq += 1
            if len(chunk) < 0xFFFFFF:
                break
        self.seq = seq - 1

    async def read(self, timeout: float = 10.0) -> bytes:
        payload = b""
        while True:
            header = await asyncio.wait_for(self.reader.readexactly(4), timeout)
            size = int.from_bytes(header[:3], "little")
            self.seq = header[3]
            payload += await asyncio.wait_for(self.reader.readexactly(size), timeout)
            if size < 0xFFFFFF:
                return payload

    async def _auth_answer(self, password: str | None) -> Err | Ok:
        answer = await self.read()
        if answer[0] == 0xFE:  # AuthSwitchRequest: the same plugin with a fresh salt, say
            plugin, _, data = answer[1:].partition(b"\0")
            assert plugin == b"mysql_native_password", plugin
            self.send(native_password(password, data.rstrip(b"\0")), self.seq + 1)
            answer = await self.read()
        if answer[0] == 0xFF:
            return _parse_err(answer)
        assert answer[0] == 0x00, answer
        return Ok(answer)

    async def authenticate(
        self, user: str, password: str | None, database: str | None, extra_capabilities: int = 0
    ) -> Err | Ok:
        capabilities = RAW_CAPABILITIES | extra_capabilities | (CLIENT_CONNECT_WITH_DB if database else 0)
        self.deprecate_eof = bool(capabilities & CLIENT_DEPRECATE_EOF)
        auth = native_password(password, self.salt)
        payload = struct.pack("<IIB23x", capabilities, 1 << 24, UTF8MB4_GENERAL_CI) + user.encode() + b"\0"
        payload += bytes([len(auth)]) + auth
        if database:
            payload += database.encode() + b"\0"
        payload += b"mysql_native_password\0"
        self.send(payload, 1)
        return await self._auth_answer(password)

    async def _result(self) -> Result:
        first = await self.read()
        if first[0] == 0xFF:
            return _parse_err(first)
        if first[0] == 0x00:
            return Ok(first)
        columns, _ = _lenenc(first, 0)
        assert columns is not None
        for _ in range(columns):
            await self.read()
        if not self.deprecate_eof:
            eof = await self.read()
            assert eof[0] == 0xFE, eof
        rows: list[bytes] = []
        while True:
            packet = await self.read()
            if packet[0] == 0xFE and len(packet) < (0xFFFFFF if self.deprecate_eof else 9):
                return rows
            if packet[0] == 0xFF:
                return _parse_err(packet)
            rows.append(packet)

    async def query(self, sql: str) -> Result:
        self.send(bytes([COM_QUERY]) + sql.encode(), 0)
        return await self._result()

    async def scalar(self, sql: str) -> bytes | None:
        rows = await self.query(sql)
        assert isinstance(rows, list) and len(rows) == 1, rows
        return _text_row(rows[0])[0]

    async def command(self, command: int, body: bytes = b"") -> Err | Ok:
        self.send(bytes([command]) + body, 0)
        answer = await self.read()
        return _parse_err(answer) if answer[0] == 0xFF else Ok(answer)

    async def prepare(self, sql: str) -> Err | tuple[int, int, int]:
        """COM_STMT_PREPARE: (statement id, columns, parameters), or the error."""
        self.send(bytes([COM_STMT_PREPARE]) + sql.encode(), 0)
        first = await self.read()
        if first[0] == 0xFF:
            return _parse_err(first)
        assert first[0] == 0x00, first
        statement, columns, params = struct.unpack_from("<IHH", first, 1)
        for count in (params, columns):
            for _ in range(count):
                await self.read()
            if count and not self.deprecate_eof:
                assert (await self.read())[0] == 0xFE
        return statement, columns, params

    async def execute(self, statement: int, params: Sequence[int] = ()) -> Result:
        """COM_STMT_EXECUTE with BIGINT parameters; the binary rows come back raw."""
        body = struct.pack("<BIBI", COM_STMT_EXECUTE, statement, 0, 1)
        if params:
            body += bytes((len(params) + 7) // 8) + b"\x01" + b"\x08\x00" * len(params)
            body += b"".join(struct.pack("<q", p) for p in params)
        self.send(body, 0)
        return await self._result()

    def close_statement(self, statement: int) -> None:
        self.send(struct.pack("<BI", COM_STMT_CLOSE, statement), 0)  # no answer

    async def change_user(self, user: str, password: str | None, database: str | None = DATABASE) -> Err | Ok:
        auth = native_password(password, self.salt)
        body = bytes([COM_CHANGE_USER]) + user.encode() + b"\0" + bytes([len(auth)]) + auth
        body += (database or "").encode() + b"\0" + struct.pack("<H", UTF8MB4_GENERAL_CI) + b"mysql_native_password\0"
        self.send(body, 0)
        return await self._auth_answer(password)

    async def ended(self, timeout: float = 5.0) -> bool:
        """True once the proxy closed the connection or answered with an error packet; False
        when it is still open and silent after ``timeout``."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return not data or (len(data) > 4 and data[4] == 0xFF)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


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


# --- 5. protocol coverage -------------------------------------------------------------------------------


async def test_init_db_and_use_change_the_database_label(mysql_server: MySqlServer) -> None:
    other = _name("db")
    await _sql(mysql_server, f"CREATE DATABASE {other}; GRANT ALL ON {other}.* TO '{APP_USER}'@'127.0.0.1';")
    try:
        async with proxied_mysql(mysql_server) as proxy:
            conn = await _connect(proxy, program_name="hopper", autocommit=True)
            try:
                await _run(conn, "SELECT 1")
                await asyncio.to_thread(conn.select_db, other)  # COM_INIT_DB
                assert await _run(conn, "SELECT DATABASE()") == [(other,)]
                await _run(conn, "USE test")  # USE as a statement
                await _run(conn, "SELECT 3")
            finally:
                await _close(conn)
            conn = await _connect(proxy, program_name="hopper", database=None, autocommit=True)
            try:
                await _run(conn, "SELECT 4")
            finally:
                await _close(conn)
            assert _total(proxy, app="hopper", verb="SELECT", database=DATABASE) == 2
            assert _total(proxy, app="hopper", verb="SELECT", database=other) == 1
            assert _total(proxy, app="hopper", verb="SELECT", database="") == 1
    finally:
        await _sql(mysql_server, f"DROP DATABASE {other}")


async def test_dropping_the_current_database_clears_the_label(mysql_server: MySqlServer) -> None:
    """After DROP DATABASE of the session's database the server has none (DATABASE() is NULL):
    statements after it are not labelled with the dropped name."""
    scratch = _name("db")
    async with proxied_mysql(mysql_server) as proxy:
        conn = await _connect(proxy, user=SUPERUSER, password=None, program_name="dropper", autocommit=True)
        try:
            await _run(conn, f"CREATE DATABASE {scratch}")
            await asyncio.to_thread(conn.select_db, scratch)
            await _run(conn, "SELECT 1")
            await _run(conn, f"DROP DATABASE {scratch}")
            assert await _run(conn, "SELECT DATABASE()") == [(None,)]
        finally:
            await _close(conn)
        assert _total(proxy, app="dropper", verb="SELECT", database=scratch) == 1
        assert _total(proxy, app="dropper", verb="SELECT", database="") == 1


async def test_server_errors_are_counted_by_sqlstate_class(mysql_server: MySqlServer, table: str) -> None:
    async with proxied_mysql(mysql_server) as proxy:
        conn = await _connect(proxy, program_name="clumsy", autocommit=True)
        try:
            error = await _refused(conn, "SELECT * FROM no_such_table_here")
            assert error.args[0] == 1146  # ER_NO_SUCH_TABLE, SQLSTATE 42S02
            error = await _refused(conn, f"INSERT INTO {table} (id, a) VALUES (1, 1)")
            assert error.args[0] == 1062  # ER_DUP_ENTRY, SQLSTATE 23000
            error = await _refused(conn, "SELEKT 1")
            assert error.args[0] == 1064  # ER_PARSE_ERROR, SQLSTATE 42000
            assert await _run(conn, "SELECT 1") == [(1,)]
        finally:
            await _close(conn)
        assert proxy.counter("errors", app="clumsy", sqlstate_class="42") == 2
        assert proxy.counter("errors", app="clumsy", sqlstate_class="23") == 1
        assert proxy.counter("errors") == 3
        assert proxy.counter("denied") == 0


async def test_ping_is_answered_and_not_a_statement(mysql_server: MySqlServer) -> None:
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await _connect(proxy, program_name="pinger", autocommit=True)
        try:
            assert _total(proxy, verb="SET") == 1  # PyMySQL's SET NAMES
            for _ in range(3):
                await asyncio.to_thread(conn.ping, False)
            assert _total(proxy) == 1  # pings are no statements
            assert await _run(conn, "SELECT 1") == [(1,)]
        finally:
            await _close(conn)
        client = await RawClient.login(proxy.port)  # sends nothing on its own
        try:
            assert isinstance(await client.command(COM_PING), Ok)
            assert isinstance(await client.command(COM_INIT_DB, DATABASE.encode()), Ok)
            answer = await client.command(COM_INIT_DB, b"no_such_database")
            assert isinstance(answer, Err) and answer.code == 1044, answer  # access denied to it
            assert await client.scalar("SELECT 2") == b"2"
        finally:
            await client.close()
        assert _total(proxy) == 3
        assert _total(proxy, verb="SELECT") == 2


async def test_change_user_switches_the_identity_the_policies_see(mysql_server: MySqlServer, table: str) -> None:
    """COM_CHANGE_USER (no installed client sends it on request: a raw socket does). A rule on
    ``users`` must follow the session's new user."""
    rule = {"name": "nopass-reads-only", "match": {"verbs": ["DELETE"], "users": [NOPASS_USER]}, "action": "deny"}
    async with proxied_mysql(mysql_server, [rule]) as proxy:
        control = await RawClient.login(proxy.port, NOPASS_USER, None)  # logged in as nopass: denied
        try:
            answer = await control.query(f"DELETE FROM {table} WHERE a = 3")
            assert isinstance(answer, Err) and answer.code == ER_TABLEACCESS_DENIED, answer
        finally:
            await control.close()
        client = await RawClient.login(proxy.port)
        try:
            assert isinstance(await client.query(f"DELETE FROM {table} WHERE a = 1"), Ok)
            answer = await client.change_user(NOPASS_USER, None)
            assert isinstance(answer, Ok), answer
            assert await client.scalar("SELECT CURRENT_USER()") == f"{NOPASS_USER}@127.0.0.1".encode()
            answer = await client.query(f"DELETE FROM {table} WHERE a = 2")
            assert isinstance(answer, Err) and answer.code == ER_TABLEACCESS_DENIED, answer
            assert "nopass-reads-only" in answer.message
            answer = await client.change_user(APP_USER, "wrong")
            assert isinstance(answer, Err) and answer.code == ER_ACCESS_DENIED, answer
        finally:
            await client.close()
        assert _total(proxy, app=APP_USER, verb="DELETE") == 1
        assert proxy.counter("denied", rule="nopass-reads-only", app=NOPASS_USER) == 2
        await wait_until(lambda: proxy.counter("active") == 0, what="the session to end")
    assert await _count(mysql_server, table) == 2


async def test_large_result_set_streams_complete(mysql_server: MySqlServer) -> None:
    rows = 50_000
    sql = f"SELECT seq, REPEAT(CHAR(65 + seq % 26 USING ascii), 100) FROM seq_1_to_{rows}"
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await _connect(proxy, program_name="bulk", cursorclass=pymysql.cursors.SSCursor, autocommit=True)

        def stream() -> tuple[int, int, int]:
            count = total = size = 0
            with conn.cursor() as cur:
                cur.execute(sql)
                for seq, text in cur:
                    count, total, size = count + 1, total + seq, size + len(text)
                    assert text == chr(65 + seq % 26) * 100
            return count, total, size

        try:
            count, total, size = await asyncio.to_thread(stream)
            assert await _run(conn, "SELECT 2") == [(2,)]
        finally:
            await _close(conn)
        assert (count, total, size) == (rows, rows * (rows + 1) // 2, rows * 100)
        assert _total(proxy, app="bulk", verb="SELECT") == 2


@pytest.fixture
async def big_packets(mysql_server: MySqlServer) -> AsyncIterator[int]:
    """max_allowed_packet raised to 64 MiB for the connections made meanwhile."""
    before = int((await _sql(mysql_server, "SELECT @@GLOBAL.max_allowed_packet")).strip())
    await _sql(mysql_server, "SET GLOBAL max_allowed_packet = 67108864")
    try:
        yield 67108864
    finally:
        await _sql(mysql_server, f"SET GLOBAL max_allowed_packet = {before}")


async def test_rows_over_16_mib_both_directions(mysql_server: MySqlServer, big_packets: int) -> None:
    """A statement and a row beyond one packet (16 MiB - 1): split on the wire, whole to the decoder."""
    blob = os.urandom(17 * 1024 * 1024)
    name = _name()
    await _sql(mysql_server, f"CREATE TABLE {name} (id INT PRIMARY KEY, b LONGBLOB)")
    try:
        async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
            conn = await _connect(proxy, program_name="big", max_allowed_packet=big_packets, autocommit=True)
            try:
                started = time.monotonic()
                await _run(conn, f"INSERT INTO {name} (id, b) VALUES (1, %s)", (blob,))
                insert_seconds = time.monotonic() - started
                (back,) = await _run(conn, f"SELECT b FROM {name} WHERE id = 1")
                assert back[0] == blob
                assert await _run(conn, "SELECT 11") == [(11,)]
            finally:
                await _close(conn)
            assert _total(proxy, app="big", verb="INSERT") == 1
            assert _total(proxy, app="big", verb="SELECT") == 2
            assert proxy.counter("decode_errors") == 0
        out = await _sql(mysql_server, f"SELECT LENGTH(b), MD5(b) FROM {name}")
        assert out.split() == [str(len(blob)), hashlib.md5(blob).hexdigest()]
        # Straight to the server this takes about a second (mostly PyMySQL escaping the bytes).
        assert insert_seconds < 8, f"a 17 MiB INSERT took {insert_seconds:.1f}s through the proxy"
    finally:
        await _sql(mysql_server, f"DROP TABLE IF EXISTS {name}")


async def test_refused_statement_over_16_mib_keeps_the_session_in_sync(
    mysql_server: MySqlServer, table: str, big_packets: int
) -> None:
    """A denied statement spanning two packets (sequence 0 and 1): the refusal must carry the
    next sequence number (2) and the session must go on."""
    blob = b"z" * (17 * 1024 * 1024)
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await _connect(proxy, program_name="big", max_allowed_packet=big_packets, autocommit=True)
        try:
            error = await _refused(conn, f"DELETE FROM {table} WHERE a = 1 OR %s = ''", (blob,))
            assert error.args[0] == ER_TABLEACCESS_DENIED, error
            assert await _run(conn, f"SELECT COUNT(*) FROM {table}") == [(3,)]
        finally:
            await _close(conn)
        assert proxy.counter("denied", app="big", rule="no-destructive") == 1
        assert proxy.counter("decode_errors") == 0
    assert await _count(mysql_server, table) == 3


async def test_load_data_local_infile(mysql_server: MySqlServer, tmp_path: Path) -> None:
    rows = 100_000
    data = tmp_path / "rows.tsv"
    data.write_text("".join(f"{i}\t{'p' * 30}{i:08d}\n" for i in range(1, rows + 1)))
    assert data.stat().st_size > 4_000_000
    name = _name()
    await _sql(mysql_server, f"CREATE TABLE {name} (id INT PRIMARY KEY, s VARCHAR(64))")
    await _sql(mysql_server, "SET GLOBAL local_infile = 1")
    deny_load = {"name": "no-load", "match": {"verbs": ["LOAD"]}, "action": "deny"}
    try:
        async with proxied_mysql(mysql_server) as proxy:
            conn = await _connect(proxy, program_name="loader", local_infile=True, autocommit=True)
            try:
                await _run(conn, f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE {name} (id, s)")
                assert await _run(conn, f"SELECT COUNT(*), SUM(id) FROM {name}") == [(rows, rows * (rows + 1) // 2)]
                await proxy.apply([deny_load])
                error = await _refused(conn, f"LOAD DATA LOCAL INFILE '{data}' REPLACE INTO TABLE {name} (id, s)")
                assert error.args[0] == ER_TABLEACCESS_DENIED and "no-load" in error.args[1]
                assert await _run(conn, "SELECT 12") == [(12,)]
            finally:
                await _close(conn)
            assert _total(proxy, app="loader", verb="LOAD") == 1
            assert proxy.counter("denied", app="loader", rule="no-load") == 1
        assert await _count(mysql_server, name) == rows
        assert await _count(mysql_server, name, f"WHERE s = '{'p' * 30}{rows:08d}'") == 1
    finally:
        await _sql(mysql_server, f"DROP TABLE IF EXISTS {name}")


async def test_authentication_passes_through(mysql_server: MySqlServer) -> None:
    async with proxied_mysql(mysql_server) as proxy:
        for user, password in ((APP_USER, APP_PASSWORD), (NOPASS_USER, None), (SUPERUSER, None)):
            conn = await _connect(proxy, user=user, password=password, autocommit=True)
            try:
                assert await _run(conn, "SELECT CURRENT_USER()") == [(f"{user}@127.0.0.1",)]
            finally:
                await _close(conn)
        with pytest.raises(pymysql.err.OperationalError) as info:
            await _connect(proxy, user=APP_USER, password="wrong")
        assert info.value.args[0] == ER_ACCESS_DENIED
        code, _, err = await _exec(*proxy.client_args(APP_USER, "wrong"), "-e", "SELECT 1")
        assert code != 0 and f"ERROR {ER_ACCESS_DENIED} (28000)" in err, err
        code, out, err = await _cli(proxy, "SELECT CURRENT_USER()")
        assert (code, out.strip()) == (0, f"{APP_USER}@127.0.0.1"), err
        assert proxy.counter("errors", sqlstate_class="28") == 2
        assert proxy.counter("sessions") == 6
        await wait_until(lambda: proxy.counter("active") == 0, what="sessions to end")


async def test_ed25519_authentication_passes_through(mysql_server: MySqlServer) -> None:
    if not mysql_server.ed25519_available:
        pytest.skip(f"no ed25519 user on the test server: {mysql_server.ed25519_error}")
    async with proxied_mysql(mysql_server) as proxy:
        conn = await _connect(proxy, user=ED25519_USER, password=ED25519_PASSWORD, autocommit=True)
        try:
            assert await _run(conn, "SELECT CURRENT_USER()") == [(f"{ED25519_USER}@127.0.0.1",)]
        finally:
            await _close(conn)
        code, out, err = await _cli(proxy, "SELECT 6", ED25519_USER, ED25519_PASSWORD)
        assert (code, out.strip()) == (0, "6"), err
        with pytest.raises(pymysql.err.OperationalError) as info:
            await _connect(proxy, user=ED25519_USER, password="wrong")
        assert info.value.args[0] == ER_ACCESS_DENIED
        assert _total(proxy, app=ED25519_USER, verb="SELECT") == 1
        assert _total(proxy, app="mysql", verb="SELECT") == 1


# --- 6. bad input -----------------------------------------------------------------------------------------


def _packet(payload: bytes, seq: int = 0) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


async def _bystander(proxy: MySqlProxy) -> aiomysql.Connection:
    kwargs = proxy.connect_kwargs(program_name="bystander", autocommit=True)
    kwargs["db"] = kwargs.pop("database")
    return await aiomysql.connect(**kwargs)


async def _bystander_works(conn: aiomysql.Connection, value: int) -> None:
    async with conn.cursor() as cur:
        await cur.execute(f"SELECT {value}")
        assert await cur.fetchone() == (value,)


async def _nopass_sessions(server: MySqlServer) -> int:
    out = await _sql(server, f"SELECT COUNT(*) FROM information_schema.processlist WHERE user = '{NOPASS_USER}'")
    return int(out.strip())


@pytest.mark.parametrize(
    ("case", "login", "wait_for_end"),
    [
        ("garbage handshake response", False, True),  # framed, but far too short to be one
        ("unframed garbage then close", False, False),  # 0xffffff: a 16 MiB packet that never comes
        ("empty command packet", True, True),  # a packet with no command byte
        ("truncated command then close", True, False),
        ("absurd declared length then close", True, False),  # 16 MiB - 1 declared, 1 KiB sent
        ("packets out of order", True, True),  # a command with sequence number 7
    ],
)
async def test_malformed_packets_close_that_connection_only(
    mysql_server: MySqlServer, case: str, login: bool, wait_for_end: bool
) -> None:
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        bystander = await _bystander(proxy)
        try:
            await _bystander_works(bystander, 1)
            if login:
                client = await RawClient.login(proxy.port, NOPASS_USER, None)
                assert await client.scalar("SELECT 1") == b"1"
            else:
                client = await RawClient.open(proxy.port)
            bad = {
                "garbage handshake response": _packet(b"\x01\x02\x03garbage", 1),
                "unframed garbage then close": b"\xff" * 64,
                "empty command packet": _packet(b""),
                "truncated command then close": b"\x64\x00\x00\x00\x03SELECT",
                "absurd declared length then close": b"\xff\xff\xff\x00\x03" + b"x" * 1024,
                "packets out of order": _packet(b"\x03SELECT 1", 7),
            }[case]
            client.writer.write(bad)
            await client.writer.drain()
            await _bystander_works(bystander, 2)  # while the bad connection is in whatever state
            if wait_for_end:
                assert await client.ended(), f"{case}: the proxy neither closed nor answered with an error"
            await client.close()
            await wait_until(lambda: proxy.counter("active") == 1, what=f"{case}: the bad session to end")
            await wait_until(lambda: proxy.counter("decode_errors", side="client") == 1, what=f"{case}: a decode error")
            await _bystander_works(bystander, 3)
        finally:
            bystander.close()
        assert proxy.counter("decode_errors", side="server") == 0
        assert proxy.counter("decode_errors", listener="db", protocol="mysql") == 1
    # Nothing left behind on the server either.
    deadline = time.monotonic() + 5
    while await _nopass_sessions(mysql_server) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await _nopass_sessions(mysql_server) == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=300))
async def test_fuzzed_bytes_after_login_never_hurt_other_sessions(mysql_server: MySqlServer, garbage: bytes) -> None:
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        bystander = await _bystander(proxy)
        try:
            client = await RawClient.login(proxy.port, NOPASS_USER, None)
            client.writer.write(garbage + _packet(bytes([COM_QUIT])))  # then QUIT, in case it was all valid
            await client.ended(0.3)
            await client.close()
            await _bystander_works(bystander, 1)
            await wait_until(lambda: proxy.counter("active") == 1, what="the fuzzed session to end")
        finally:
            bystander.close()


async def test_seeded_random_packets_keep_the_proxy_serving(mysql_server: MySqlServer) -> None:
    """Framed packets of random commands and bodies, many sessions in a row, a bounded budget."""
    rng = random.Random(20240611)
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE]) as proxy:
        bystander = await _bystander(proxy)
        started = time.monotonic()
        rounds = 0
        try:
            while time.monotonic() - started < 3.0 and rounds < 60:
                rounds += 1
                client = await RawClient.login(proxy.port, NOPASS_USER, None)
                for _ in range(rng.randint(1, 4)):
                    body = bytes([rng.choice([0x03, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x11, 0x05, rng.randrange(256)])])
                    body += rng.randbytes(rng.randint(0, 64))
                    client.writer.write(_packet(body, rng.choice([0, 0, 0, 1, 255])))
                await client.ended(0.1)
                await client.close()
                await _bystander_works(bystander, rounds)
            await wait_until(lambda: proxy.counter("active") == 1, what="the random sessions to end")
        finally:
            bystander.close()
        assert rounds >= 10


# --- 7. TLS -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1, made by the openssl command line."""
    folder = tmp_path_factory.mktemp("mysql-tls")
    cert, key = folder / "server.pem", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


async def test_tls_is_terminated_and_the_session_is_still_inspected(
    mysql_server: MySqlServer, table: str, certificate: tuple[str, str]
) -> None:
    cert, key = certificate
    async with proxied_mysql(mysql_server, [DENY_DESTRUCTIVE], tls={"cert": cert, "key": key}) as proxy:
        raw = await RawClient.open(proxy.port)
        assert raw.capabilities & CLIENT_SSL  # offered in the greeting
        await raw.close()
        verify = ["--ssl", f"--ssl-ca={cert}", "--ssl-verify-server-cert"]
        sql = "SHOW SESSION STATUS LIKE 'Ssl_cipher'; SELECT 5"
        code, out, err = await _cli(proxy, sql, APP_USER, APP_PASSWORD, *verify)
        assert code == 0, err
        # The CLI spoke TLS (it verified our certificate), the server saw a clear connection.
        assert out.split("\n")[:2] == ["Ssl_cipher\t", "5"], out
        code, _, err = await _cli(proxy, f"DROP TABLE {table}", APP_USER, APP_PASSWORD, *verify)
        assert code != 0 and "no-destructive" in err, err
        conn = await _connect(proxy, program_name="tls", ssl_ca=cert, ssl_verify_cert=True, autocommit=True)
        try:
            assert isinstance(conn._sock, ssl.SSLSocket)
            assert await _run(conn, f"SELECT COUNT(*) FROM {table}") == [(3,)]
            error = await _refused(conn, f"DELETE FROM {table}")
            assert error.args[0] == ER_TABLEACCESS_DENIED
        finally:
            await _close(conn)
        assert _total(proxy, app="mysql", verb="SHOW") == 1
        assert _total(proxy, app="tls", verb="SELECT") == 1
        assert proxy.counter("denied") == 2
        assert proxy.counter("decode_errors") == 0
    assert await _count(mysql_server, table) == 3


@pytest.mark.parametrize("together", [False, True], ids=["apart", "one-segment"])
async def test_tls_client_hello_in_the_same_segment_as_the_ssl_request(
    mysql_server: MySqlServer, certificate: tuple[str, str], together: bool
) -> None:
    """A client may send its TLS ClientHello right behind the SSLRequest (the server sends nothing
    in between), so both can arrive in one read: written here in one write every time (and, as
    a control of this hand-made TLS client, 50 ms apart)."""
    cert, key = certificate
    async with proxied_mysql(mysql_server, tls={"cert": cert, "key": key}) as proxy:
        client = await RawClient.open(proxy.port)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ssl.create_default_context(cafile=cert).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")

        async def feed() -> None:
            data = await asyncio.wait_for(client.reader.read(65536), 5.0)
            if not data:
                raise ConnectionError("the proxy closed the connection")
            incoming.write(data)

        async def read_packet() -> bytes:
            buffered = b""
            while len(buffered) < 4 or len(buffered) < 4 + int.from_bytes(buffered[:3], "little"):
                try:
                    buffered += tls.read(65536)
                except ssl.SSLWantReadError:
                    await feed()
            return buffered[4:]

        try:
            prefix = struct.pack("<IIB23x", RAW_CAPABILITIES | CLIENT_CONNECT_WITH_DB | CLIENT_SSL, 1 << 24, 45)
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            if together:
                client.writer.write(_packet(prefix, 1) + outgoing.read())  # SSLRequest + ClientHello
            else:
                client.writer.write(_packet(prefix, 1))
                await asyncio.sleep(0.05)
                client.writer.write(outgoing.read())
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    client.writer.write(outgoing.read())
                    await feed()
            client.writer.write(outgoing.read())
            auth = native_password(APP_PASSWORD, client.salt)
            response = prefix + APP_USER.encode() + b"\0" + bytes([len(auth)]) + auth + DATABASE.encode() + b"\0"
            tls.write(_packet(response + b"mysql_native_password\0", 2))
            client.writer.write(outgoing.read())
            answer = await read_packet()
            assert answer[0] == 0x00, answer  # logged in, over TLS
            tls.write(_packet(bytes([COM_PING])))
            client.writer.write(outgoing.read())
            assert (await read_packet())[0] == 0x00
        finally:
            await client.close()
        assert proxy.counter("decode_errors") == 0


@pytest.mark.parametrize("use_tls", [False, True], ids=["clear", "tls"])
async def test_server_side_kill_ends_the_client_session(
    mysql_server: MySqlServer, certificate: tuple[str, str], use_tls: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The server ends a session (KILL): the proxy passes the end on to the client, in clear
    as over TLS, and forgets the session; an ordinary end logs no error."""
    cert, key = certificate
    listener: dict[str, Any] = {"tls": {"cert": cert, "key": key}} if use_tls else {}
    tls_args: dict[str, Any] = {"ssl_ca": cert, "ssl_verify_cert": True} if use_tls else {}
    async with proxied_mysql(mysql_server, **listener) as proxy:
        conn = await _connect(proxy, program_name="killed", read_timeout=5, autocommit=True, **tls_args)
        try:
            assert isinstance(conn._sock, ssl.SSLSocket) == use_tls
            ((backend,),) = await _run(conn, "SELECT CONNECTION_ID()")
            await _sql(mysql_server, f"KILL CONNECTION {backend}")
            await asyncio.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(pymysql.err.OperationalError) as info:
                await _run(conn, "SELECT 1")
            assert info.value.args[0] in (2006, 2013, 1927), info.value  # gone away, lost, killed
            assert time.monotonic() - started < 3
        finally:
            await _close(conn)
        await wait_until(lambda: proxy.counter("active") == 0, what="the killed session to end")
        assert proxy.counter("sessions", app="killed") == 1
    errors = [f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_without_tls_ssl_is_not_offered(mysql_server: MySqlServer) -> None:
    async with proxied_mysql(mysql_server) as proxy:
        raw = await RawClient.open(proxy.port)
        assert not raw.capabilities & CLIENT_SSL  # cleared in the greeting
        await raw.close()
        # Clients that require TLS give up cleanly ...
        with pytest.raises(pymysql.err.OperationalError) as info:
            await _connect(proxy, ssl={"check_hostname": False, "verify_mode": False})
        assert info.value.args[0] == 2026  # CR_SSL_CONNECTION_ERROR, said by the client itself
        code, _, err = await _cli(proxy, "SELECT 1", APP_USER, APP_PASSWORD, "--ssl-verify-server-cert")
        assert code != 0 and "2026" in err, err
        # ... clients that only prefer it go on in clear.
        conn = await _connect(proxy, program_name="clear", autocommit=True)  # PyMySQL prefers TLS by default
        try:
            assert not isinstance(conn._sock, ssl.SSLSocket)
            assert await _run(conn, "SELECT 1") == [(1,)]
        finally:
            await _close(conn)
        code, out, err = await _cli(proxy, "SELECT 8", APP_USER, APP_PASSWORD, "--ssl")
        assert (code, out.strip()) == (0, "8"), err
        await wait_until(lambda: proxy.counter("active") == 0, what="sessions to end")
        assert proxy.counter("decode_errors") == 0
