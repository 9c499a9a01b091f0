"""The postgres listener speaks the whole protocol: startup, TLS, auth, cancel, COPY,
notifications, and bad bytes that close only their own connection."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.l7.pg_helpers import DENY_DESTRUCTIVE, Proxy, count_rows, new_table, pg_proxy, psql, run
from tests.pgserver import (
    DATABASE,
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    SUPERUSER,
    PgServer,
    find_bin_dir,
    server_account,
)
from tests.support import wait_until

# --- identity ----------------------------------------------------------------------------------------


async def test_identity_listener_app_then_application_name_then_user(pg_server: PgServer) -> None:
    async with pg_proxy(pg_server, app="orders") as fixed:
        conn = await asyncpg.connect(fixed.dsn(app="something-else"))
        await conn.fetchval("SELECT 1")
        await conn.close()
        assert fixed.counter("statements", app="orders", verb="SELECT") == 1
    async with pg_proxy(pg_server) as proxy:
        conn = await asyncpg.connect(proxy.dsn(app="billing"))
        await conn.fetchval("SELECT 1")
        await conn.close()
        conn = await asyncpg.connect(proxy.dsn())  # no application_name: the user
        await conn.fetchval("SELECT 1")
        await conn.close()
        assert proxy.counter("statements", app="billing", verb="SELECT") == 1
        assert proxy.counter("statements", app=SUPERUSER, verb="SELECT") == 1
        assert proxy.counter("sessions") == 2
        await wait_until(lambda: proxy.counter("active") == 0, what="sessions to end")


# --- authentication passes through -------------------------------------------------------------------


@pytest.mark.parametrize(("user", "password"), [(MD5_USER, MD5_PASSWORD), (SCRAM_USER, SCRAM_PASSWORD)])
async def test_password_auth_passes_through(pg_server: PgServer, user: str, password: str) -> None:
    async with pg_proxy(pg_server) as proxy:
        conn = await asyncpg.connect(proxy.dsn(user=user, password=password))
        assert await conn.fetchval("SELECT current_user") == user
        await conn.close()
        with pytest.raises(asyncpg.exceptions.InvalidPasswordError):
            await asyncpg.connect(proxy.dsn(user=user, password="wrong"))
        env = {**os.environ, "PGPASSWORD": password}
        code, out, err = await run(
            "psql", "-X", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", user, "-d", DATABASE, "-tAc", "SELECT 5",
            env=env,
        )  # fmt: skip
        assert (code, out.strip()) == (0, "5"), err
        assert proxy.counter("errors", sqlstate_class="28") == 1  # the wrong password


# --- SSLRequest, TLS termination --------------------------------------------------------------------


async def test_sslrequest_is_answered_no_without_tls(pg_server: PgServer) -> None:
    async with pg_proxy(pg_server) as proxy:
        env = {**os.environ, "PGSSLMODE": "prefer"}
        code, out, err = await run(*_psql_args(proxy, "SELECT 1"), env=env)
        assert (code, out.strip()) == (0, "1"), err
        env["PGSSLMODE"] = "require"
        code, _, err = await run(*_psql_args(proxy, "SELECT 1"), env=env)
        assert code != 0 and "SSL" in err


def _psql_args(proxy: Proxy, sql: str) -> list[str]:
    return ["psql", "-X", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", SUPERUSER, "-d", DATABASE, "-tAc", sql]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate made by the openssl command line."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "server.pem", folder / "server.key"
    import subprocess

    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


async def test_tls_is_terminated_and_the_session_is_still_inspected(
    pg_server: PgServer, certificate: tuple[str, str]
) -> None:
    cert, key = certificate
    table = await new_table(pg_server, rows=2)
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE], tls={"cert": cert, "key": key}) as proxy:
        env = {**os.environ, "PGSSLMODE": "require"}
        sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        code, out, err = await run(*_psql_args(proxy, sql), env=env)
        assert code == 0, err
        assert out.strip() == "f"  # TLS ended at the proxy: the server saw a clear connection
        code, out, err = await run(*_psql_args(proxy, f"DELETE FROM {table}"), env=env)
        assert code != 0 and "no-destructive" in err
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(), sslmode="require", autocommit=True)
        assert conn.info.pgconn.ssl_in_use
        assert await (await conn.execute("SELECT 3")).fetchone() == (3,)
        await conn.close()
    assert await count_rows(pg_server, table) == 2


async def test_server_ending_a_tls_session_closes_the_client_cleanly(
    pg_server: PgServer, certificate: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The server's FIN cannot be passed on as a half-close over TLS: the proxy closes the TLS
    connection (before, write_eof raised NotImplementedError and asyncio logged a fatal error)."""
    cert, key = certificate
    async with pg_proxy(pg_server, tls={"cert": cert, "key": key}) as proxy:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(app="ended"), sslmode="require", autocommit=True)
        pid = conn.info.backend_pid
        async with await psycopg.AsyncConnection.connect(pg_server.dsn(), autocommit=True) as direct:
            await direct.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("SELECT 1")
        await conn.close()
        # The listener goes on serving TLS clients.
        async with await psycopg.AsyncConnection.connect(proxy.dsn(), sslmode="require") as again:
            assert await (await again.execute("SELECT 4")).fetchone() == (4,)
    assert not [r for r in caplog.records if "Fatal error" in r.getMessage()], caplog.text


# --- cancel -------------------------------------------------------------------------------------------------


async def test_cancel_request_reaches_the_backend(pg_server: PgServer) -> None:
    async with pg_proxy(pg_server) as proxy:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(app="canceller"), autocommit=True)
        try:
            started = time.monotonic()
            query = asyncio.ensure_future(conn.execute("SELECT pg_sleep(20)"))
            await asyncio.sleep(0.3)
            await conn.cancel_safe()
            with pytest.raises(psycopg.errors.QueryCanceled):
                await query
            assert time.monotonic() - started < 5
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
        finally:
            await conn.close()
        assert proxy.counter("errors", sqlstate_class="57") == 1


# --- COPY, notifications -----------------------------------------------------------------------------------


async def test_copy_in_and_out_streamed(pg_server: PgServer) -> None:
    table = await new_table(pg_server, rows=0)
    rows = 200_000
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await psycopg.AsyncConnection.connect(proxy.dsn(app="copier"), autocommit=True)
        try:
            cur = conn.cursor()
            async with cur.copy(f"COPY {table} (a) FROM STDIN") as copy:  # type: ignore[arg-type]
                for start in range(0, rows, 10_000):
                    await copy.write("".join(f"{i}\n" for i in range(start, start + 10_000)))
            total = 0
            async with cur.copy(f"COPY {table} TO STDOUT") as copy:  # type: ignore[arg-type]
                async for block in copy:
                    total += bytes(block).count(b"\n")
            assert total == rows
        finally:
            await conn.close()
        assert await count_rows(pg_server, table) == rows
        assert proxy.counter("statements", app="copier", verb="COPY") == 2


async def test_notifications_pass_through(pg_server: PgServer) -> None:
    async with pg_proxy(pg_server) as proxy:
        listener = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
        sender = await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True)
        try:
            await listener.execute("LISTEN pointsman_test")
            await sender.execute("NOTIFY pointsman_test, 'hello'")
            gen = listener.notifies(timeout=5.0)
            note = await anext(gen)
            assert (note.channel, note.payload) == ("pointsman_test", "hello")
        finally:
            await listener.close()
            await sender.close()


# --- bad bytes --------------------------------------------------------------------------------------------


async def _raw_session(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-made client: startup, then read until the first ReadyForQuery."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    params = b"user\0" + SUPERUSER.encode() + b"\0database\0" + DATABASE.encode() + b"\0\0"
    writer.write(struct.pack("!ii", 8 + len(params), 196608) + params)
    while True:
        kind = await reader.readexactly(1)
        (length,) = struct.unpack("!i", await reader.readexactly(4))
        await reader.readexactly(length - 4)
        if kind == b"Z":
            return reader, writer


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        while await asyncio.wait_for(reader.read(65536), 5.0):
            pass
    except (ConnectionError, TimeoutError):
        return isinstance(reader.exception(), ConnectionError)
    return True


async def test_malformed_bytes_close_that_connection_only(pg_server: PgServer) -> None:
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        bystander = await asyncpg.connect(proxy.dsn(app="bystander"))
        reader, writer = await _raw_session(proxy)
        writer.write(b"Q\x00\x00\x00\x02")  # a length below 4 cannot be framed
        assert await _closed(reader)
        writer.close()
        assert proxy.counter("decode_errors", side="client") == 1
        assert await bystander.fetchval("SELECT 2") == 2
        await bystander.close()
        # Garbage instead of a startup packet: closed too, before any server is involved.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"\xff" * 64)
        assert await _closed(reader)
        writer.close()
        assert proxy.counter("decode_errors", side="client") == 2


async def test_undecodable_session_without_enforcing_rules_is_forwarded_blind(pg_server: PgServer) -> None:
    rules = [{"name": "watch", "match": {"verbs": ["DROP"]}, "action": "log"}]
    async with pg_proxy(pg_server, rules) as proxy:
        reader, writer = await _raw_session(proxy)
        writer.write(b"@\x00\x00\x00\x04")  # a message type the protocol does not have
        try:
            # The server itself refuses the bytes: its FATAL error names the type it saw.
            data = await asyncio.wait_for(reader.read(65536), 5.0)
            assert data[:1] == b"E" and b"invalid frontend message type 64" in data
        finally:
            writer.close()
        assert proxy.counter("decode_errors", side="client") == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=200))
async def test_fuzzed_client_bytes_never_hurt_other_sessions(pg_server: PgServer, garbage: bytes) -> None:
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        bystander = await asyncpg.connect(proxy.dsn(app="bystander"))
        reader, writer = await _raw_session(proxy)
        writer.write(garbage + b"X\x00\x00\x00\x04")  # then Terminate, in case it was all valid
        await _closed(reader)
        writer.close()
        assert await bystander.fetchval("SELECT 1") == 1
        await bystander.close()


async def test_statements_after_many_sessions_leave_no_state(pg_server: PgServer, tmp_path: Path) -> None:
    table = await new_table(pg_server, rows=1)
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        for _ in range(20):
            code, _, err = await psql(proxy, f"SELECT * FROM {table}")
            assert code == 0, err
        await wait_until(lambda: proxy.counter("active") == 0, what="sessions to end")
        assert proxy.router.listeners["db"].pg_backends == {}


async def test_large_parameters_and_rows_stream_through(pg_server: PgServer) -> None:
    blob = os.urandom(20 * 1024 * 1024)
    async with pg_proxy(pg_server, [DENY_DESTRUCTIVE]) as proxy:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            assert await conn.fetchval("SELECT length($1::bytea)", blob) == len(blob)  # a 20 MiB Bind
            assert await conn.fetchval("SELECT $1::bytea", blob) == blob  # and a 20 MiB DataRow back
        finally:
            await conn.close()


@pytest.fixture(scope="module")
def tls_pg_server(certificate: tuple[str, str]) -> Iterator[PgServer]:
    """A second server that accepts TLS (its key must belong to the account that runs it)."""
    if find_bin_dir() is None:
        pytest.skip("no PostgreSQL server binaries")
    # Not under pytest's tmp dir: that is private to us, and the server may run as another user.
    folder = Path(tempfile.mkdtemp(prefix="pointsman-tls-", dir="/tmp"))
    folder.chmod(0o755)
    cert, key = folder / "server.pem", folder / "server.key"
    shutil.copyfile(certificate[0], cert)
    shutil.copyfile(certificate[1], key)
    key.chmod(0o600)
    account = server_account()
    if account is not None:
        for path in (cert, key):
            os.chown(path, account.pw_uid, account.pw_gid)
    try:
        with PgServer(settings={"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)}) as server:
            yield server
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_tls_to_the_server_when_configured(tls_pg_server: PgServer, certificate: tuple[str, str]) -> None:
    sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    async with pg_proxy(tls_pg_server, tls={"upstream": "require"}) as proxy:
        conn = await asyncpg.connect(proxy.dsn(), ssl=False)  # the client speaks clear to the proxy
        assert await conn.fetchval(sql) is True  # and the proxy TLS to the server
        await conn.close()
    cert, key = certificate
    async with pg_proxy(tls_pg_server, tls={"cert": cert, "key": key, "upstream": "require"}) as proxy:
        env = {**os.environ, "PGSSLMODE": "require"}
        code, out, err = await run(*_psql_args(proxy, sql), env=env)
        assert (code, out.strip()) == (0, "t"), err


async def test_upstream_tls_required_but_refused_closes_the_client(pg_server: PgServer) -> None:
    async with pg_proxy(pg_server, tls={"upstream": "require"}) as proxy:
        with pytest.raises((ConnectionError, asyncpg.exceptions.PostgresError, OSError)):
            await asyncpg.connect(proxy.dsn(), ssl=False, timeout=5)
        await wait_until(lambda: proxy.router.listeners["db"].connections == set(), what="the session to end")


async def test_gssencrequest_is_answered_no_then_startup_goes_on(pg_server: PgServer) -> None:
    async with pg_proxy(pg_server) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(struct.pack("!ii", 8, 80877104))  # GSSENCRequest
            assert await asyncio.wait_for(reader.readexactly(1), 5.0) == b"N"
            writer.write(struct.pack("!ii", 8, 80877103))  # then SSLRequest, as libpq does
            assert await asyncio.wait_for(reader.readexactly(1), 5.0) == b"N"
            params = b"user\0" + SUPERUSER.encode() + b"\0database\0" + DATABASE.encode() + b"\0\0"
            writer.write(struct.pack("!ii", 8 + len(params), 196608) + params)
            kind = await asyncio.wait_for(reader.readexactly(1), 5.0)
            assert kind == b"R"  # the server's authentication request: the session goes on
        finally:
            writer.close()
