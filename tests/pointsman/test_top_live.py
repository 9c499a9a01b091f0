"""``pointsman top --once`` against real instances: ``pointsman router`` in front of the test
PostgreSQL, ``pointsman up`` in front of an aiohttp upstream, and an older instance without
``/http/stats``. The frame and snapshot arithmetic are in test_top.py.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pointsman import top
from tests.pgserver import DATABASE, SUPERUSER, PgServer, clean_env
from tests.pointsman.harness import eventually, http_upstream, pointsman, run_cli, up_args, write_config
from tests.pointsman.test_top import SNAPSHOT, _table_rows

POSTGRES_LISTENER = re.compile(r"pointsman: listener (\S+) postgres (\S+)$")


async def test_top_once_shows_the_statements_of_a_real_router(tmp_path: Path, pg_server: PgServer) -> None:
    if shutil.which("psql") is None:  # make deps installs it (postgresql-client)
        (pytest.fail if os.environ.get("CI") else pytest.skip)("psql is not installed")
    config = tmp_path / "pointsman.yaml"
    write_config(
        config,
        {
            "admin": {"listen": "127.0.0.1:0"},
            "clusters": {"pg": {"endpoints": [f"127.0.0.1:{pg_server.port}"]}},
            "listeners": [{"name": "db", "listen": "127.0.0.1:0", "protocol": "postgres", "to": "pg"}],
        },
    )
    async with pointsman("router", "--config", str(config)) as running:
        port = next(m.group(2) for line in running.lines if (m := POSTGRES_LISTENER.search(line))).rsplit(":", 1)[1]
        table = f"top_{os.getpid()}"
        statements = [f"CREATE TABLE {table} (id int)", *(f"INSERT INTO {table} VALUES ({i})" for i in range(5))]
        psql = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", port, "-U", SUPERUSER, "-d", DATABASE]
        proc = await asyncio.create_subprocess_exec(
            *psql,
            *(arg for sql in statements for arg in ("-c", sql)),
            env={**clean_env(), "PGAPPNAME": "orders"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()

        # The sampler runs once a second: wait for a sample after the INSERTs, so the
        # frame shows a rate too, not only the total.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def insert_rate_shows() -> bool:
                async with session.get(running.url("/sql/stats")) as response:
                    rows = (await response.json())["statements"]
                return any(r["app"] == "orders" and r["verb"] == "INSERT" and r["rate"] > 0 for r in rows)

            await eventually(insert_rate_shows, timeout=10, what="a rate for the INSERTs")

        code, out, err_text = await run_cli("top", "--once", "--admin", running.admin)
    assert code == 0, err_text
    print(out)  # the frame, for `pytest -s`
    assert out.startswith(f"pointsman top - admin {running.admin} - ")
    assert "sessions: none open" in out  # psql has left
    rows = {(r[0], r[1], r[2]): r for r in _table_rows(out, "LISTENER  APP")}
    insert = rows[("db", "orders", "INSERT")]
    assert insert[4] == "5"  # TOTAL
    assert float(insert[3]) > 0  # RATE/s
    assert all(re.fullmatch(r"\d+\.\d{3}", cell) for cell in insert[5:8])  # mean, p50, p99 in ms
    assert rows[("db", "orders", "CREATE")][4] == "1"
    assert "\x1b" not in out  # a pipe gets no escape codes


async def test_top_once_against_an_unreachable_instance(closed_port: int) -> None:
    code, out, err = await run_cli("top", "--once", "--admin", f"127.0.0.1:{closed_port}")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert f"http://127.0.0.1:{closed_port}/sql/stats: cannot reach the admin API" in err


# -- end to end: HTTP through a real `pointsman up` ----------------------------------------------


def _upstream() -> web.Application:
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="failed")

    app.router.add_get("/hello", hello)
    app.router.add_get("/fail", fail)
    return app


async def test_top_once_shows_the_http_routes_of_a_real_instance(tmp_path: Path) -> None:
    sent, failed = 30, 5
    async with http_upstream(_upstream()) as (host, port):
        config = tmp_path / "pointsman.yaml"
        write_config(
            config,
            {
                "admin": {"listen": "127.0.0.1:0"},
                "clusters": {"app": {"endpoints": [f"{host}:{port}"]}},
                "listeners": [
                    {
                        "name": "web",
                        "listen": "127.0.0.1:0",
                        "routes": [{"name": "api", "match": {"path_prefix": "/"}, "to": "app"}],
                    }
                ],
            },
        )
        async with (
            pointsman(*up_args(config)) as running,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        ):
            # About 20 requests a second for 1.5 s; every sixth one answered 500 upstream.
            for i in range(sent):
                path = "/fail" if i % 6 == 5 else "/hello"
                async with session.get(running.listener_url("web", path)) as response:
                    assert response.status == (500 if path == "/fail" else 200)
                await asyncio.sleep(0.05)

            # Wait for a sample taken after the last request: then the window holds them all.
            async def all_in_the_window() -> bool:
                async with session.get(running.url("/http/stats")) as response:
                    snap = await response.json()
                return any(
                    r["route"] == "api" and round(r["rate"] * snap["window_seconds"]) == sent for r in snap["routes"]
                )

            await eventually(all_in_the_window, timeout=10, what="every request in the rate window")
            code, out, err_text = await run_cli("top", "--once", "--admin", running.admin)
    assert code == 0, err_text
    print(out)  # the frame, for `pytest -s`
    lines = out.splitlines()
    assert lines[0].startswith(f"pointsman top - admin {running.admin} - ")
    assert lines[1] == "no SQL traffic"  # no postgres listener here
    summary = next(line for line in lines if "requests" in line)
    m = re.fullmatch(r"window (\d+\.\d)s   requests (\d+\.\d)/s   5xx (\d+\.\d)/s", summary)
    assert m is not None, summary
    window, rate, errors = (float(g) for g in m.groups())
    # The figures of a real clock: all the requests in a window of 2 to 6 s.
    assert 1.5 <= window <= 6.0
    assert abs(rate * window - sent) <= 0.05 * window + 0.5
    assert abs(errors * window - failed) <= 0.05 * window + 0.5
    assert "connections: " in out and "in flight: none" in out
    [row] = _table_rows(out, "LISTENER  ROUTE")
    assert row[:3] == ["web", "api", "app"]
    assert float(row[3]) == rate and float(row[4]) == errors
    assert row[5] == str(sent)  # TOTAL
    assert all(re.fullmatch(r"\d+\.\d{3}", cell) for cell in row[6:9])  # mean, p50, p99 in ms
    assert float(row[7]) <= float(row[8])
    assert "\x1b" not in out


async def test_an_instance_without_http_stats_still_shows_sql() -> None:
    """An older instance (no /http/stats, a 404) and one with neither endpoint, on a real
    socket; ``top.run`` and its urllib fetch run in a thread, as the command runs them."""
    app = web.Application()

    async def sql_stats(request: web.Request) -> web.Response:
        return web.json_response(SNAPSHOT)

    app.router.add_get("/sql/stats", sql_stats)
    async with http_upstream(app) as address:
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(top.run, address, once=True, out=out, err=err)
        assert code == 0, err.getvalue()
        assert "INSERT" in out.getvalue() and "ROUTE" not in out.getvalue()

    async with http_upstream(web.Application()) as address:
        out, err = io.StringIO(), io.StringIO()
        code = await asyncio.to_thread(top.run, address, once=True, out=out, err=err)
        assert code == 1 and out.getvalue() == ""
        assert err.getvalue() == f"http://{address[0]}:{address[1]}/sql/stats: HTTP 404 Not Found\n"
