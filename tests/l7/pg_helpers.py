"""Helpers for the PostgreSQL listener tests: a router in front of the test server, and the
real clients (psql, pgbench as subprocesses; psycopg and asyncpg in the test's loop)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from router.listeners import Router
from tests.pgserver import DATABASE, SUPERUSER, PgServer
from tests.support import running_router

DENY_DESTRUCTIVE: dict[str, Any] = {
    "name": "no-destructive",
    "match": {"verbs": ["DROP", "DELETE", "TRUNCATE"]},
    "action": "deny",
}


@dataclass
class Proxy:
    router: Router
    port: int
    server: PgServer

    def dsn(self, user: str = SUPERUSER, password: str | None = None, app: str | None = None) -> str:
        dsn = f"postgresql://{user}{':' + password if password else ''}@127.0.0.1:{self.port}/{DATABASE}"
        return dsn + (f"?application_name={app}" if app else "")

    def counter(self, name: str, **labels: str) -> float:
        """Sum of a SQL counter's series whose labels include ``labels``."""
        stats = self.router.sql_stats
        counter = getattr(stats, name)
        total = 0.0
        for key, value in counter.values.items():
            named = dict(zip(counter.labels, key, strict=True))
            if all(named.get(k) == v for k, v in labels.items()):
                total += value
        return total

    async def apply(self, policies: Sequence[dict[str, Any]], **listener: Any) -> None:
        """Reload the router with other policies (as a config reload would)."""
        from pointsman.config import parse_config

        parsed = parse_config(_config(self.server, policies, listener), "<test>")  # same listen: same socket
        await self.router.apply(parsed.clusters, parsed.listeners, parsed.policies)


def _config(
    server: PgServer, policies: Sequence[dict[str, Any]], listener: dict[str, Any], port: int = 0
) -> dict[str, Any]:
    return {
        "clusters": {"pg": {"endpoints": [f"127.0.0.1:{server.port}"]}},
        "listeners": [
            {
                "name": "db",
                "listen": f"127.0.0.1:{port}",
                "protocol": "postgres",
                "to": "pg",
                "policies": [p["name"] for p in policies],
                **listener,
            }
        ],
        "policies": list(policies),
    }


@asynccontextmanager
async def pg_proxy(server: PgServer, policies: Sequence[dict[str, Any]] = (), **listener: Any) -> AsyncIterator[Proxy]:
    async with running_router(_config(server, policies, listener)) as router:
        yield Proxy(router, router.address_of("db")[1], server)


async def direct(server: PgServer) -> asyncpg.Connection:
    """A connection straight to the server (to check what really happened)."""
    return await asyncpg.connect(host="127.0.0.1", port=server.port, user=SUPERUSER, database=DATABASE)


async def new_table(server: PgServer, rows: int = 3) -> str:
    """A fresh table ``t_<random>(a int)`` holding 1..rows."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    conn = await direct(server)
    try:
        await conn.execute(f"CREATE TABLE {name} (a int); INSERT INTO {name} SELECT generate_series(1, {rows})")
    finally:
        await conn.close()
    return name


async def count_rows(server: PgServer, table: str) -> int:
    conn = await direct(server)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


async def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, str, str]:
    """A client program; returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def psql(proxy: Proxy, *sql: str, user: str = SUPERUSER, extra: Sequence[str] = ()) -> tuple[int, str, str]:
    args = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", user, "-d", DATABASE]
    for statement in sql:
        args += ["-c", statement]
    return await run(*args, *extra)
