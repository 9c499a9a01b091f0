"""The demo web service: a few endpoints over one PostgreSQL table, run by the scheduler.

    HOST=127.0.0.1 PORT_HTTP=8000 DB_ADDR=127.0.0.1:5432 python3 apps/demo/app.py

Environment: HOST and PORT_HTTP (where to listen; the scheduler sets both), DB_ADDR
("host:port" of PostgreSQL, database ``demo``, user ``postgres``, no TLS), POINTSMAN_ALLOC_ID
(the instance's name, shown on every page). See apps/demo/README.md.

Endpoints: ``GET /``, ``GET /healthz`` (200 whenever the process serves; the body says whether
the database answers), ``POST /orders`` (form or JSON ``{"item": ...}``), ``GET /orders`` (the
last 20 and the count), ``POST /orders/purge`` (``DELETE FROM orders``: 403 with the server's
message and SQLSTATE when it is refused with 42501, as a policy of pointsman's SQL listener
does; 503 for any other database error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from html import escape
from typing import Any, TypeVar

try:
    import psycopg
    from aiohttp import web
except ImportError as exc:  # not the project's venv: say so rather than a traceback
    sys.exit(
        f"demo: the Python package {exc.name!r} is missing: run this with .venv/bin/python (`make run` installs it)"
    )

log = logging.getLogger("demo")

APPLICATION_NAME = "demo-web"
DATABASE = "demo"
DB_USER = "postgres"
CONNECT_TIMEOUT_S = 3  # libpq's connect_timeout: whole seconds
STATEMENT_TIMEOUT_S = 5.0  # a request never waits longer than this on the database
POOL_MAX_IDLE = 4  # connections kept open between requests
POOL_IDLE_TIMEOUT_S = 60.0  # an idle connection older than this is closed instead of reused
HEALTH_DB_RECHECK_S = 2.0  # /healthz probes the database only when nothing told us lately
HEALTH_DB_TIMEOUT_S = 0.8  # and gives the probe this long
LAST_ORDERS = 20
MAX_ITEM_CHARS = 200

SCHEMA = """\
CREATE TABLE IF NOT EXISTS orders(
    id serial PRIMARY KEY,
    item text NOT NULL,
    created_at timestamptz DEFAULT now()
)"""

ENDPOINTS = (
    ("GET", "/", "this page"),
    ("GET", "/healthz", "200 while the process serves; the body says whether the database answers"),
    ("POST", "/orders", 'add an order: form field or JSON {"item": "..."}'),
    ("GET", "/orders", f"the last {LAST_ORDERS} orders and the total count"),
    ("POST", "/orders/purge", "DELETE FROM orders (403 with the SQLSTATE when refused)"),
)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]


class ConfigError(ValueError):
    """A bad environment variable; the message names it."""


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    db_host: str
    db_port: int
    instance: str

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str]) -> Settings:
        port = _port(env.get("PORT_HTTP", "8000"), "PORT_HTTP")
        db_host, db_port = _address(env.get("DB_ADDR", "127.0.0.1:5432"), "DB_ADDR")
        return cls(
            host=env.get("HOST", "127.0.0.1"),
            port=port,
            db_host=db_host,
            db_port=db_port,
            instance=env.get("POINTSMAN_ALLOC_ID") or f"local-{os.getpid()}",
        )


def _port(text: str, name: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{name} must be a port number (1-65535), not {text!r}")
    return int(text)


def _address(text: str, name: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{name} must be host:port, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, _port(port, name)


class Pool:
    """A handful of open connections reused across requests; any connection that saw an error
    is closed, so the next request connects afresh (the database may have restarted)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._idle: list[tuple[Conn, float]] = []  # (connection, when it was released)
        self.schema_ready = False
        self._schema_lock = asyncio.Lock()

    async def _connect(self) -> Conn:
        return await psycopg.AsyncConnection.connect(
            host=self._settings.db_host,
            port=self._settings.db_port,
            dbname=DATABASE,
            user=DB_USER,
            application_name=APPLICATION_NAME,
            sslmode="disable",
            connect_timeout=CONNECT_TIMEOUT_S,
            autocommit=True,
        )

    async def _take_idle(self) -> Conn | None:
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if not conn.closed and now - since < POOL_IDLE_TIMEOUT_S:
                return conn
            await conn.close()
        return None

    async def _give_back(self, conn: Conn) -> None:
        healthy = not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if healthy and len(self._idle) < POOL_MAX_IDLE:
            self._idle.append((conn, time.monotonic()))
        else:
            await conn.close()

    async def run(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``work`` on a connection. A reused connection that turns out dead (the server
        restarted while it sat idle) is replaced once; a missing table is created once."""
        for attempt in range(3):
            conn = await self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT_S + 1)
            try:
                if not self.schema_ready:
                    await self._ensure_schema(conn)
                result = await asyncio.wait_for(work(conn), STATEMENT_TIMEOUT_S)
            except psycopg.errors.UndefinedTable:
                await self._give_back(conn)
                if attempt > 0:
                    raise
                self.schema_ready = False  # the database was replaced under us: create it again
                continue
            except psycopg.OperationalError:
                await conn.close()
                if reused and conn.broken and attempt == 0:
                    continue  # died while idle: the statement never ran, try a fresh connection
                raise
            except BaseException:
                await conn.close()
                raise
            await self._give_back(conn)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ensure_schema(self, conn: Conn) -> None:
        async with self._schema_lock:
            if self.schema_ready:
                return
            try:
                await conn.execute(SCHEMA)
            except psycopg.errors.InsufficientPrivilege:
                # DDL refused (a policy, say): fine as long as the table is there already.
                row = await (await conn.execute("SELECT to_regclass('orders') IS NOT NULL")).fetchone()
                if not (row and row[0]):
                    raise
            self.schema_ready = True

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            await conn.close()


# -- handlers ----------------------------------------------------------------------------------

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", Pool)


@dataclass
class DbState:
    """The last word from the database (for /healthz): None before any."""

    reachable: bool | None = None
    error: str | None = None
    at: float | None = None  # time.monotonic()


DB_STATE = web.AppKey("db_state", DbState)


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda obj: json.dumps(obj, default=str))


def _db_error(exc: BaseException) -> web.Response:
    """403 for a refusal (SQLSTATE 42501), 503 for anything else the database said or did."""
    if isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate
        message = exc.diag.message_primary or str(exc).strip() or type(exc).__name__
    else:  # a timeout
        sqlstate, message = None, f"database did not answer within {STATEMENT_TIMEOUT_S:g}s"
    status = 403 if sqlstate == "42501" else 503
    return _json({"error": message, "sqlstate": sqlstate}, status=status)


DB_ERRORS = (psycopg.Error, TimeoutError, OSError)


def _note_db(app: web.Application, error: BaseException | None) -> None:
    """Remember the last word from the database, for /healthz. Only a failure to reach it or a
    dead connection counts as unreachable: an error the server sent proves it is there."""
    state = app[DB_STATE]
    state.at = time.monotonic()
    if error is None or (isinstance(error, psycopg.Error) and error.sqlstate is not None):
        state.reachable, state.error = True, None
    else:
        state.reachable, state.error = False, str(error).strip() or type(error).__name__


async def _db(request: web.Request, work: Callable[[Conn], Awaitable[T]]) -> T:
    try:
        result = await request.app[POOL].run(work)
    except DB_ERRORS as exc:
        _note_db(request.app, exc)
        raise
    _note_db(request.app, None)
    return result


async def index(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    rows = "\n".join(
        f"<li><code>{method} {escape(path)}</code>: {escape(text)}</li>" for method, path, text in ENDPOINTS
    )
    body = f"""<!doctype html>
<html><head><title>pointsman demo</title></head>
<body>
<h1>pointsman demo</h1>
<p>Answered by instance <strong>{escape(settings.instance)}</strong>
({escape(settings.host)}:{settings.port}); database at {escape(settings.db_host)}:{settings.db_port}.</p>
<ul>
{rows}
</ul>
</body></html>
"""
    return web.Response(text=body, content_type="text/html")


async def healthz(request: web.Request) -> web.Response:
    """Always 200 while we serve: a restarting database must not take every instance out of the
    router. The database's state comes from the last request that used it, or from a probe
    when that is older than HEALTH_DB_RECHECK_S."""
    app = request.app
    state = app[DB_STATE]
    if state.at is None or time.monotonic() - state.at > HEALTH_DB_RECHECK_S:

        async def probe(conn: Conn) -> None:
            await conn.execute("SELECT 1")

        try:
            # Bounded: a health check must answer fast even when the database's host does not.
            await asyncio.wait_for(_db(request, probe), HEALTH_DB_TIMEOUT_S)
        except TimeoutError:
            _note_db(app, TimeoutError(f"no answer within {HEALTH_DB_TIMEOUT_S:g}s"))
        except DB_ERRORS:
            pass  # noted by _db
    settings = app[SETTINGS]
    return _json(
        {
            "status": "ok",
            "instance": settings.instance,
            "db": {
                "address": f"{settings.db_host}:{settings.db_port}",
                "reachable": state.reachable,
                "error": state.error,
            },
        }
    )


def _order(row: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": row[0], "item": row[1], "created_at": row[2].isoformat() if row[2] else None}


async def create_order(request: web.Request) -> web.Response:
    item: object = None
    if request.content_type == "application/json":
        try:
            data = await request.json()
        except ValueError:
            return _json({"error": "the body is not valid JSON"}, status=400)
        item = data.get("item") if isinstance(data, dict) else None
    else:
        item = (await request.post()).get("item")
    if not isinstance(item, str) or not item.strip():
        return _json({"error": 'give a non-empty "item" (form field or JSON)'}, status=400)
    if len(item) > MAX_ITEM_CHARS:
        return _json({"error": f'"item" is longer than {MAX_ITEM_CHARS} characters'}, status=400)

    async def insert(conn: Conn) -> tuple[Any, ...] | None:
        cur = await conn.execute("INSERT INTO orders(item) VALUES (%s) RETURNING id, item, created_at", (item,))
        return await cur.fetchone()

    try:
        row = await _db(request, insert)
    except DB_ERRORS as exc:
        return _db_error(exc)
    assert row is not None
    return _json({**_order(row), "instance": request.app[SETTINGS].instance}, status=201)


async def list_orders(request: web.Request) -> web.Response:
    async def select(conn: Conn) -> tuple[int, list[tuple[Any, ...]]]:
        cur = await conn.execute("SELECT id, item, created_at FROM orders ORDER BY id DESC LIMIT %s", (LAST_ORDERS,))
        rows = await cur.fetchall()
        count = await (await conn.execute("SELECT count(*) FROM orders")).fetchone()
        return (int(count[0]) if count else 0), rows

    try:
        count, rows = await _db(request, select)
    except DB_ERRORS as exc:
        return _db_error(exc)
    return _json({"count": count, "orders": [_order(r) for r in rows], "instance": request.app[SETTINGS].instance})


async def purge_orders(request: web.Request) -> web.Response:
    async def delete(conn: Conn) -> int:
        cur = await conn.execute("DELETE FROM orders")
        return cur.rowcount

    try:
        deleted = await _db(request, delete)
    except DB_ERRORS as exc:
        return _db_error(exc)
    return _json({"deleted": deleted, "instance": request.app[SETTINGS].instance})


# -- wiring ------------------------------------------------------------------------------------


def make_app(settings: Settings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app[POOL] = Pool(settings)
    app[DB_STATE] = DbState()
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/orders", create_order)
    app.router.add_get("/orders", list_orders)
    app.router.add_post("/orders/purge", purge_orders)

    async def close_pool(app: web.Application) -> None:
        await app[POOL].close()

    app.on_cleanup.append(close_pool)
    return app


def main() -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    log.info(
        "instance %s on %s:%d, database %s:%d",
        settings.instance,
        settings.host,
        settings.port,
        settings.db_host,
        settings.db_port,
    )
    # run_app stops on SIGTERM and SIGINT: it stops accepting, lets requests in flight finish
    # (up to shutdown_timeout), closes the pool (on_cleanup) and returns.
    web.run_app(
        make_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=logging.getLogger("demo.access"),
        access_log_format='%a "%r" %s %b %Tfs',
        shutdown_timeout=5,
        print=None,
    )
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
