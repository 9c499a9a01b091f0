"""Helpers for the MySQL listener tests: a router with a ``protocol: mysql`` listener in front
of the test MariaDB (tests/mysqlserver.py), PyMySQL keyword arguments and mariadb CLI argv
pointed at it, and the listener's SQL counters.

    async with proxied_mysql(mysql_server, policies=[DENY_DROP]) as proxy:
        conn = pymysql.connect(**proxy.connect_kwargs())
        ...
        assert proxy.counter("statements", verb="SELECT") == 1
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from router.listeners import Router
from tests.mysqlserver import APP_PASSWORD, APP_USER, DATABASE, MySqlServer
from tests.support import running_router

LISTENER = "db"

DENY_DROP: dict[str, Any] = {
    "name": "no-drop",
    "match": {"verbs": ["DROP", "TRUNCATE"]},
    "action": "deny",
}


@dataclass
class MySqlProxy:
    router: Router
    port: int
    server: MySqlServer
    listener: dict[str, Any] = field(default_factory=dict)  # extra listener settings (app, identity, tls...)
    host: str = "127.0.0.1"

    def connect_kwargs(self, user: str = APP_USER, password: str | None = APP_PASSWORD, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for ``pymysql.connect`` to the proxy (database ``test`` unless
        ``database=`` says otherwise; ``database=None`` connects without one)."""
        kwargs: dict[str, Any] = {"host": self.host, "port": self.port, "user": user, "password": password or ""}
        database = extra.pop("database", DATABASE)
        if database is not None:
            kwargs["database"] = database
        kwargs.update(extra)
        return kwargs

    def client_args(
        self, user: str = APP_USER, password: str | None = APP_PASSWORD, database: str | None = DATABASE
    ) -> list[str]:
        """argv for the ``mariadb`` CLI over TCP to the proxy; append ``-e SQL`` or feed stdin.
        Run it with ``env=tests.mysqlserver.clean_env()``."""
        args = [self.server.binaries.client, "--no-defaults", "--protocol=TCP", "-h", self.host, "-P", str(self.port)]
        args += ["-u", user]
        args.append(f"--password={password}" if password else "--skip-password")
        if database is not None:
            args.append(f"--database={database}")
        return args

    def counter(self, name: str, **labels: str) -> float:
        """Sum of a SQL counter's series whose labels include ``labels``."""
        counter = getattr(self.router.sql_stats, name)
        total = 0.0
        for key, value in counter.values.items():
            named = dict(zip(counter.labels, key, strict=True))
            if all(named.get(k) == v for k, v in labels.items()):
                total += value
        return total

    async def apply(self, policies: Sequence[dict[str, Any]], **listener: Any) -> None:
        """Reload the router with other policies. The listen address stays the one configured
        (127.0.0.1:0), so the router keeps the socket; the bound port would read as a new
        address, bound a second time."""
        from pointsman.config import parse_config

        settings = {**self.listener, **listener}
        parsed = parse_config(_config(self.server, policies, settings), "<test>")
        await self.router.apply(parsed.clusters, parsed.listeners, parsed.policies)


def _config(server: MySqlServer, policies: Sequence[dict[str, Any]], listener: dict[str, Any]) -> dict[str, Any]:
    return {
        "clusters": {"my": {"endpoints": [f"127.0.0.1:{server.port}"]}},
        "listeners": [
            {
                "name": LISTENER,
                "listen": "127.0.0.1:0",
                "protocol": "mysql",
                "to": "my",
                "policies": [p["name"] for p in policies],
                **listener,
            }
        ],
        "policies": list(policies),
    }


@asynccontextmanager
async def proxied_mysql(
    server: MySqlServer,
    policies: Sequence[dict[str, Any]] = (),
    app: str | None = None,
    identity: dict[str, Any] | None = None,
    **listener: Any,
) -> AsyncIterator[MySqlProxy]:
    """A router whose listener ``db`` (protocol mysql) forwards to ``server``. ``app`` and
    ``identity`` are the listener's fixed identity settings; other keyword arguments are
    further listener settings (``tls=...``)."""
    settings = dict(listener)
    if app is not None:
        settings["app"] = app
    if identity is not None:
        settings["identity"] = identity
    async with running_router(_config(server, policies, settings)) as router:
        yield MySqlProxy(router, router.address_of(LISTENER)[1], server, settings)


# -- wire builders for the sans-IO tests (what a MariaDB server and a client send) ----------------

SERVER_CAPS = 0xF7FE | (0x81BF << 16) & ~(1 << 26)  # as MariaDB 10.11 announces (CLIENT_MYSQL clear)
CLIENT_CAPS = 0x000FA68C | (1 << 19) | (1 << 20) | (1 << 21)  # PROTOCOL_41, SECURE, PLUGIN_AUTH, ATTRS, ...


def pkt(payload: bytes, seq: int) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes((seq & 0xFF,)) + payload


def lenenc_int(n: int) -> bytes:
    if n < 0xFB:
        return bytes((n,))
    if n < 1 << 16:
        return b"\xfc" + n.to_bytes(2, "little")
    if n < 1 << 24:
        return b"\xfd" + n.to_bytes(3, "little")
    return b"\xfe" + n.to_bytes(8, "little")


def lenenc_str(s: bytes) -> bytes:
    return lenenc_int(len(s)) + s


def greeting(caps: int = SERVER_CAPS, ext: int = 0x1F, status: int = 2) -> bytes:
    body = b"\x0a" + b"10.11.6-MariaDB\0" + (7).to_bytes(4, "little") + b"abcdefgh" + b"\0"
    body += (caps & 0xFFFF).to_bytes(2, "little") + b"\x2d" + status.to_bytes(2, "little")
    body += (caps >> 16).to_bytes(2, "little") + bytes((21,)) + b"\0" * 6 + ext.to_bytes(4, "little")
    body += b"ijklmnopqrst\0" + b"mysql_native_password\0"
    return pkt(body, 0)


def handshake_response(
    user: str = "app",
    database: str | None = "test",
    attrs: dict[str, str] | None = None,
    caps: int = CLIENT_CAPS,
    ext: int = 0x1F,
    seq: int = 1,
    deprecate_eof: bool = False,
) -> bytes:
    caps |= 1 << 24 if deprecate_eof else 0
    caps |= 0x8 if database is not None else 0
    body = caps.to_bytes(4, "little") + (1 << 24).to_bytes(4, "little") + b"\x2d" + b"\0" * 19
    body += ext.to_bytes(4, "little") + user.encode() + b"\0" + lenenc_str(b"x" * 20)
    if database is not None:
        body += database.encode() + b"\0"
    body += b"mysql_native_password\0"
    encoded = b"".join(lenenc_str(k.encode()) + lenenc_str(v.encode()) for k, v in (attrs or {}).items())
    body += lenenc_str(encoded)
    return pkt(body, seq)


def ssl_request(caps: int = CLIENT_CAPS | 0x800, seq: int = 1) -> bytes:
    return pkt(caps.to_bytes(4, "little") + (1 << 24).to_bytes(4, "little") + b"\x2d" + b"\0" * 19 + b"\x1f\0\0\0", seq)


def ok(seq: int = 1, status: int = 2, affected: int = 0, header: int = 0) -> bytes:
    return pkt(bytes((header,)) + lenenc_int(affected) + b"\0" + status.to_bytes(2, "little") + b"\0\0", seq)


def eof(seq: int, status: int = 2) -> bytes:
    return pkt(b"\xfe\0\0" + status.to_bytes(2, "little"), seq)


def err(seq: int = 1, code: int = 1064, state: str = "42000", message: str = "syntax") -> bytes:
    return pkt(b"\xff" + code.to_bytes(2, "little") + b"#" + state.encode() + message.encode(), seq)


def coldef(name: str, seq: int) -> bytes:
    body = b"".join(lenenc_str(s) for s in (b"def", b"test", b"t", b"t", name.encode(), name.encode()))
    return pkt(body + b"\x0c\x21\0\x0b\0\0\0\x03\0\0\0\0\0", seq)


def resultset(rows: list[list[bytes]], seq: int = 1, status: int = 2, deprecate_eof: bool = False) -> bytes:
    """A text result set (column count, definitions, [EOF], rows, EOF or OK 0xFE)."""
    ncols = len(rows[0]) if rows else 1
    out = pkt(lenenc_int(ncols), seq)
    seq += 1
    for i in range(ncols):
        out += coldef(f"c{i}", seq)
        seq += 1
    if not deprecate_eof:
        out += eof(seq)
        seq += 1
    for row in rows:
        out += pkt(b"".join(lenenc_str(v) for v in row), seq)
        seq += 1
    return out + (ok(seq, status, header=0xFE) if deprecate_eof else eof(seq, status))


def command(cmd: int, body: bytes = b"") -> bytes:
    return pkt(bytes((cmd,)) + body, 0)


def query(sql: str) -> bytes:
    return command(0x03, sql.encode())


def prepare_ok(stmt_id: int, columns: int, params: int, deprecate_eof: bool = False) -> bytes:
    out = pkt(
        b"\0"
        + stmt_id.to_bytes(4, "little")
        + columns.to_bytes(2, "little")
        + params.to_bytes(2, "little")
        + b"\0\0\0",
        1,
    )
    seq = 2
    for group in (params, columns):
        for i in range(group):
            out += coldef(f"p{i}", seq)
            seq += 1
        if group and not deprecate_eof:
            out += eof(seq)
            seq += 1
    return out


def execute(stmt_id: int, params: bytes = b"") -> bytes:
    return command(0x17, stmt_id.to_bytes(4, "little") + b"\0" + (1).to_bytes(4, "little") + params)


def binary_resultset(values: list[bytes], seq: int = 1, deprecate_eof: bool = False) -> bytes:
    out = pkt(b"\x01", seq) + coldef("c", seq + 1)
    seq += 2
    if not deprecate_eof:
        out += eof(seq)
        seq += 1
    for v in values:
        out += pkt(b"\0\0" + lenenc_str(v), seq)
        seq += 1
    return out + (ok(seq, header=0xFE) if deprecate_eof else eof(seq))
