"""A few real-server checks of the MySQL listener (the broad suite is test_mysql_listener.py):
PyMySQL through pointsman, statements counted, a denied DROP answered with ERR 1142 on a
connection that stays usable."""

from __future__ import annotations

import asyncio
import uuid

import pymysql
import pytest

from tests.l7.mysql_helpers import DENY_DROP, proxied_mysql
from tests.mysqlserver import MySqlServer


async def test_select_and_insert_are_counted(mysql_server: MySqlServer) -> None:
    table = f"t_{uuid.uuid4().hex[:8]}"
    async with proxied_mysql(mysql_server, policies=[DENY_DROP]) as proxy:

        def work() -> list[tuple[int, ...]]:
            conn = pymysql.connect(**proxy.connect_kwargs())
            try:
                with conn.cursor() as cur:
                    cur.execute(f"CREATE TABLE {table} (a int)")
                    cur.execute(f"INSERT INTO {table} VALUES (%s), (%s)", (1, 2))
                    conn.commit()
                    cur.execute(f"SELECT a FROM {table} ORDER BY a")
                    return list(cur.fetchall())
            finally:
                conn.close()

        assert await asyncio.to_thread(work) == [(1,), (2,)]
        assert proxy.counter("statements", verb="SELECT", database="test") >= 1
        assert proxy.counter("statements", verb="INSERT") == 1
        assert proxy.counter("statements", verb="CREATE") == 1
        assert proxy.counter("transactions", outcome="committed") == 1
        assert proxy.counter("sessions", app="app", protocol="mysql") == 1
        assert proxy.counter("decode_errors") == 0


async def test_denied_drop_is_an_err_1142_and_the_connection_lives_on(mysql_server: MySqlServer) -> None:
    table = f"t_{uuid.uuid4().hex[:8]}"
    mysql_server.sql(f"CREATE TABLE {table} (a int); INSERT INTO {table} VALUES (7)", database="test")
    async with proxied_mysql(mysql_server, policies=[DENY_DROP]) as proxy:

        def work() -> tuple[int, str, int]:
            conn = pymysql.connect(**proxy.connect_kwargs())
            try:
                with conn.cursor() as cur:
                    with pytest.raises(pymysql.err.OperationalError) as denied:
                        cur.execute(f"DROP TABLE {table}")
                    cur.execute(f"SELECT a FROM {table}")
                    (value,) = cur.fetchone()
                    return denied.value.args[0], denied.value.args[1], value
            finally:
                conn.close()

        code, message, value = await asyncio.to_thread(work)
        assert code == 1142 and "no-drop" in message
        assert value == 7  # not dropped, and the connection still answers
        assert proxy.counter("denied", rule="no-drop") == 1
    assert "7" in mysql_server.sql(f"SELECT a FROM {table}", database="test")


async def test_prepared_statements_and_the_cli(mysql_server: MySqlServer) -> None:
    async with proxied_mysql(mysql_server, policies=[DENY_DROP], app="cli") as proxy:
        proc = await asyncio.create_subprocess_exec(
            *proxy.client_args(),
            "-e",
            "SELECT 1; SELECT 2; DROP TABLE nope",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1 and b"1142" in err and b"no-drop" in err
        assert proxy.counter("statements", app="cli", verb="SELECT") == 2
        assert proxy.counter("denied", app="cli") == 1
