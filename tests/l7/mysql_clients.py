"""What the mysql listener's end-to-end tests (test_mysql_listener.py, test_mysql_protocol.py)
share: the policy and error codes they expect, checks straight on the server, PyMySQL and the
mariadb CLI through the proxy, and a hand-made client on a raw socket for what those do not
send (the binary protocol, cursors, COM_CHANGE_USER, malformed packets)."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pymysql
import pymysql.cursors
import pytest
from pymysql.constants import CLIENT

from tests.l7.mysql_helpers import MySqlProxy
from tests.mysqlserver import (
    APP_PASSWORD,
    APP_USER,
    DATABASE,
    MySqlServer,
    clean_env,
)

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
