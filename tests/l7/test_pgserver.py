"""The throwaway PostgreSQL (tests/pgserver.py) answers real clients the way proxy tests need."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests import pgserver
from tests.pgserver import (
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    PgServer,
    pgbench_init,
)

PASSWORD_USERS = [(MD5_USER, MD5_PASSWORD), (SCRAM_USER, SCRAM_PASSWORD)]


def test_psycopg_select(pg_server: PgServer) -> None:
    with psycopg.connect(pg_server.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT current_database(), current_user").fetchone() == ("test", "postgres")


async def test_asyncpg_fetch(pg_server: PgServer) -> None:
    conn = await asyncpg.connect(pg_server.dsn(), timeout=5)
    try:
        rows = await conn.fetch("SELECT g AS n FROM generate_series(1, 3) AS g")
        assert [row["n"] for row in rows] == [1, 2, 3]
    finally:
        await conn.close()


def test_psql(pg_server: PgServer) -> None:
    psql = pg_server.bin_dir / "psql"
    if not psql.exists():
        found = shutil.which("psql")
        assert found, "no psql next to the server binaries nor on the PATH (apt-get install postgresql-client)"
        psql = Path(found)
    out = subprocess.run(
        [str(psql), "-X", "-A", "-t", "-d", pg_server.dsn(), "-c", "SELECT 6 * 7"],
        capture_output=True,
        text=True,
        timeout=30,
        env=pgserver.clean_env(),
        check=True,
    )
    assert out.stdout.strip() == "42"


def test_password_users_use_md5_and_scram(pg_server: PgServer) -> None:
    """The two users really exercise different methods: how each password is stored and which
    pg_hba line applies to it (the trust line comes after both)."""
    with psycopg.connect(pg_server.dsn(), connect_timeout=5) as conn:
        stored: dict[str, str] = dict(
            conn.execute(
                "SELECT rolname, split_part(rolpassword, '$', 1) FROM pg_authid WHERE rolname = ANY(%s)",
                [[MD5_USER, SCRAM_USER]],
            ).fetchall()
        )
        methods = conn.execute("SELECT user_name, auth_method FROM pg_hba_file_rules WHERE type = 'host'").fetchall()
    assert stored[SCRAM_USER] == "SCRAM-SHA-256"
    assert stored[MD5_USER].startswith("md5")
    assert methods == [([MD5_USER], "md5"), ([SCRAM_USER], "scram-sha-256"), (["all"], "trust")]


@pytest.mark.parametrize(("user", "password"), PASSWORD_USERS)
def test_psycopg_password_auth(pg_server: PgServer, user: str, password: str) -> None:
    with psycopg.connect(pg_server.dsn(user, password=password), connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_server.dsn(user, password=password + "x"), connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(pg_server.dsn(user), connect_timeout=5)


@pytest.mark.parametrize(("user", "password"), PASSWORD_USERS)
async def test_asyncpg_password_auth(pg_server: PgServer, user: str, password: str) -> None:
    conn = await asyncpg.connect(pg_server.dsn(user, password=password), timeout=5)
    try:
        assert await conn.fetchval("SELECT current_user") == user
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg_server.dsn(user, password="wrong"), timeout=5)


def test_pgbench_init(pg_server: PgServer) -> None:
    pgbench_init(pg_server, scale=1)
    with psycopg.connect(pg_server.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone() == (100_000,)


# pg_server only for its skip-or-fail when PostgreSQL is missing; this test starts its own.
@pytest.mark.usefixtures("pg_server")
def test_start_retries_when_the_port_is_taken(monkeypatch: pytest.MonkeyPatch, busy_port: int) -> None:
    """PostgreSQL cannot bind port 0, so start() probes for a free port and retries when someone
    takes it before the postmaster binds: here the first probe hands out a port in use."""
    probes = iter([busy_port])
    real_free_port = pgserver.free_port
    monkeypatch.setattr(pgserver, "free_port", lambda: next(probes, None) or real_free_port())
    with PgServer() as server:
        assert server.port not in (0, busy_port)
        base = server.base_dir
        assert base is not None and base.exists()
        with psycopg.connect(server.dsn(), connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not base.exists()
