"""The throwaway MariaDB (tests/mysqlserver.py) answers real clients the way proxy tests need."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiomysql
import pymysql
import pytest

from tests import mysqlserver
from tests.mysqlserver import (
    APP_PASSWORD,
    APP_USER,
    DATABASE,
    ED25519_PASSWORD,
    ED25519_USER,
    NOPASS_USER,
    SUPERUSER,
    MySqlServer,
    MySqlServerError,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCESS_DENIED = 1045  # ER_ACCESS_DENIED_ERROR


def need_ed25519(server: MySqlServer) -> None:
    if not server.ed25519_available:
        pytest.skip(f"the ed25519 user could not be created (auth_ed25519 plugin): {server.ed25519_error}")


def query(server: MySqlServer, sql: str, user: str = APP_USER, password: str | None = APP_PASSWORD) -> tuple:
    with pymysql.connect(**server.connect_kwargs(user, password), connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


def test_mariadb_cli(mysql_server: MySqlServer) -> None:
    out = subprocess.run(
        [*mysql_server.client_args(), "--batch", "--skip-column-names", "-e", "SELECT 1, current_user()"],
        capture_output=True,
        text=True,
        timeout=30,
        env=mysqlserver.clean_env(),
        check=True,
    )
    assert out.stdout.split() == ["1", f"{APP_USER}@127.0.0.1"]


def test_server_is_local_and_private(mysql_server: MySqlServer) -> None:
    """127.0.0.1 only, no name lookups, its socket in its own temp dir (not /run/mysqld)."""
    row = mysql_server.sql("SELECT @@bind_address, @@skip_name_resolve, @@socket, @@port, @@datadir").split("\t")
    assert row[:2] == ["127.0.0.1", "1"]
    assert Path(row[2]) == mysql_server.socket_path
    assert mysql_server.socket_path.is_relative_to(mysql_server.tmpdir)
    assert int(row[3]) == mysql_server.port
    assert Path(row[4].strip()) == mysql_server.datadir


def test_users_use_the_auth_plugins_they_claim(mysql_server: MySqlServer) -> None:
    rows = mysql_server.sql("SELECT user, host, plugin FROM mysql.user WHERE host = '127.0.0.1' ORDER BY user")
    plugins = {user: plugin for user, host, plugin in (line.split("\t") for line in rows.splitlines())}
    assert plugins[APP_USER] == "mysql_native_password"
    assert plugins[NOPASS_USER] == "mysql_native_password"
    if mysql_server.ed25519_available:
        assert plugins[ED25519_USER] == "ed25519"
    assert set(mysql_server.users()) <= set(plugins)


def test_pymysql_native_password(mysql_server: MySqlServer) -> None:
    assert query(mysql_server, "SELECT current_user(), database()") == (f"{APP_USER}@127.0.0.1", DATABASE)
    with pytest.raises(pymysql.err.OperationalError) as denied:
        query(mysql_server, "SELECT 1", password=APP_PASSWORD + "x")
    assert denied.value.args[0] == ACCESS_DENIED


def test_pymysql_ed25519(mysql_server: MySqlServer) -> None:
    need_ed25519(mysql_server)
    assert query(mysql_server, "SELECT current_user()", ED25519_USER, ED25519_PASSWORD) == (
        f"{ED25519_USER}@127.0.0.1",
    )
    with pytest.raises(pymysql.err.OperationalError) as denied:
        query(mysql_server, "SELECT 1", ED25519_USER, "wrong")
    assert denied.value.args[0] == ACCESS_DENIED


def test_pymysql_no_password_and_root(mysql_server: MySqlServer) -> None:
    assert query(mysql_server, "SELECT current_user()", NOPASS_USER, None) == (f"{NOPASS_USER}@127.0.0.1",)
    assert query(mysql_server, "SELECT current_user()", SUPERUSER, None) == (f"{SUPERUSER}@127.0.0.1",)


def test_app_user_can_create_tables(mysql_server: MySqlServer) -> None:
    """What sysbench and mysqlslap need: CREATE, INSERT, SELECT, DROP in ``test``."""
    kwargs = mysql_server.connect_kwargs()
    with pymysql.connect(**kwargs, connect_timeout=5, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE fixture_check (id INT PRIMARY KEY, v VARCHAR(10)) ENGINE=InnoDB")
        try:
            cur.executemany("INSERT INTO fixture_check VALUES (%s, %s)", [(1, "a"), (2, "b")])
            cur.execute("SELECT v FROM fixture_check WHERE id = %s", (2,))
            assert cur.fetchone() == ("b",)
        finally:
            cur.execute("DROP TABLE fixture_check")


async def test_aiomysql(mysql_server: MySqlServer) -> None:
    conn = await aiomysql.connect(**mysql_server.aiomysql_kwargs(), connect_timeout=5)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT %s + 1, current_user()", (41,))
            assert await cur.fetchone() == (42, f"{APP_USER}@127.0.0.1")
    finally:
        conn.close()


async def test_aiomysql_no_password(mysql_server: MySqlServer) -> None:
    # aiomysql (0.3) has no ed25519 client plugin: ed25519 is tested through PyMySQL only.
    conn = await aiomysql.connect(**mysql_server.aiomysql_kwargs(NOPASS_USER, None), connect_timeout=5)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT current_user()")
            assert await cur.fetchone() == (f"{NOPASS_USER}@127.0.0.1",)
    finally:
        conn.close()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: nobody of ours is left to reap it here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


def test_two_servers_side_by_side(mysql_server: MySqlServer) -> None:
    with MySqlServer() as other:
        assert other.port != mysql_server.port
        assert other.tmpdir != mysql_server.tmpdir
        other.sql(f"CREATE TABLE {DATABASE}.only_here (id INT)")
        assert query(other, "SELECT COUNT(*) FROM only_here") == (0,)
        with pytest.raises(pymysql.err.ProgrammingError):  # 1146: no such table on the first one
            query(mysql_server, "SELECT COUNT(*) FROM only_here")
        base, pid = other.tmpdir, other.pid
        assert pid is not None
    assert not base.exists()
    assert _gone(pid)
    assert query(mysql_server, "SELECT 1") == (1,)


# mysql_server only for its skip-or-fail when MariaDB is missing; this test starts its own.
@pytest.mark.usefixtures("mysql_server")
def test_start_retries_when_the_port_is_taken(monkeypatch: pytest.MonkeyPatch, busy_port: int) -> None:
    """mariadbd cannot bind port 0, so start() probes for a free port and retries when someone
    takes it before mariadbd binds: here the first probe hands out a port in use."""
    probes = iter([busy_port])
    real_free_port = mysqlserver.free_port
    monkeypatch.setattr(mysqlserver, "free_port", lambda: next(probes, None) or real_free_port())
    with MySqlServer() as server:
        assert server.port not in (0, busy_port)
        assert query(server, "SELECT 1") == (1,)


@pytest.mark.usefixtures("mysql_server")
def test_a_failed_setup_leaves_nothing_running(monkeypatch: pytest.MonkeyPatch) -> None:
    server = MySqlServer()
    seen: dict[str, object] = {}

    def broken_setup(self: MySqlServer) -> None:
        seen["pid"], seen["dir"] = self.pid, self.tmpdir
        raise MySqlServerError("setup failed on purpose")

    monkeypatch.setattr(MySqlServer, "_set_up", broken_setup)
    with pytest.raises(MySqlServerError, match="on purpose"):
        server.start()
    assert isinstance(seen["pid"], int) and _gone(seen["pid"])
    assert isinstance(seen["dir"], Path) and not seen["dir"].exists()
    assert server.base_dir is None and server.pid is None


@pytest.mark.usefixtures("mysql_server")
def test_serve_prints_the_port_and_cleans_up_on_sigterm() -> None:
    """What bench/mysql.sh relies on: the port on the first line, and SIGTERM stops it all."""
    with _serving() as proc:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with pymysql.connect(host="127.0.0.1", port=port, user=APP_USER, password=APP_PASSWORD, connect_timeout=5):
            pass
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    base = Path(err.split(" in ", 1)[1].split()[0])
    assert base.name.startswith("pointsman-my-")
    assert not base.exists()
    assert not _listening(port)


def test_a_killed_owner_leaves_no_server_behind() -> None:
    """The process that started a server dies without stopping it (SIGKILL, as a CI timeout
    would): its watchdog stops the server and deletes its directory."""
    with _serving() as proc:
        assert proc.stdout is not None and proc.stderr is not None
        port = int(proc.stdout.readline())
        base = Path(proc.stderr.readline().split(" in ", 1)[1].split()[0])
        assert base.is_dir()
        proc.kill()
        proc.communicate()
        deadline = time.monotonic() + 15
        while (base.exists() or _listening(port)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not base.exists(), base
        assert not _listening(port)


@contextmanager
def _serving() -> Iterator[subprocess.Popen[str]]:
    """`python -m tests.mysqlserver --serve`, killed on the way out if still running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.mysqlserver", "--serve"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
