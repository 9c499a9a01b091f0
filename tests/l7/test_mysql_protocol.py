"""The mysql listener end to end, the wire protocol: COM_INIT_DB, ping, CHANGE_USER, large
results and rows, LOAD DATA LOCAL INFILE, authentication, malformed packets and fuzzing, TLS;
a real MariaDB behind it, real clients and a raw-socket client in front of it. What it counts
and enforces is in test_mysql_listener.py."""

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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomysql
import pymysql
import pymysql.cursors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.l7.mysql_clients import (
    CLIENT_CONNECT_WITH_DB,
    CLIENT_SSL,
    COM_INIT_DB,
    COM_PING,
    COM_QUIT,
    DENY_DESTRUCTIVE,
    ER_ACCESS_DENIED,
    ER_TABLEACCESS_DENIED,
    RAW_CAPABILITIES,
    Err,
    Ok,
    RawClient,
    _cli,
    _close,
    _connect,
    _count,
    _exec,
    _name,
    _refused,
    _run,
    _sql,
    _total,
    native_password,
)
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
)
from tests.support import wait_until

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
