"""Sidecars (`upstreams:`), end to end in a real `pointsman up`: an unmodified app is pointed
at local listeners by env vars, and its SQL is counted and policed under its job's name.

The client job talks to three upstreams through its own local ports: a TCP echo job, an HTTP
job, and a real PostgreSQL (the session's throwaway server, registered as a static service).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.mysqlserver import APP_PASSWORD, APP_USER, MySqlServer
from tests.pgserver import DATABASE, SUPERUSER, PgServer
from tests.pointsman.harness import PointsmanProcess, eventually, pointsman, up_args, write_config
from tests.pointsman.test_scheduler_up import PORT_BASE, _allocs, _netns_unavailable

ECHO = """
import asyncio, os
async def echo(reader, writer):
    writer.write(await reader.read(100)); await writer.drain(); writer.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", int(os.environ["PORT_TCP"]))
    await server.serve_forever()
asyncio.run(main())
"""

CLIENT = """
import os, socket, sys, time, urllib.request
import psycopg
print("env", os.environ["ECHO_ADDR"], os.environ["WEB_URL"], os.environ["PG_ADDR"], flush=True)
host, port = os.environ["ECHO_ADDR"].split(":")
with socket.create_connection((host, int(port)), timeout=5) as s:
    s.sendall(b"ping"); print("echo:", s.recv(100).decode(), flush=True)
print("web:", urllib.request.urlopen(os.environ["WEB_URL"], timeout=5).status, flush=True)
host, port = os.environ["PG_ADDR"].split(":")
with psycopg.connect(host=host, port=port, user=sys.argv[1], dbname=sys.argv[2], sslmode="disable",
                     connect_timeout=5, autocommit=True) as conn:
    print("pg:", conn.execute("SELECT 1").fetchone()[0], flush=True)
    try:
        conn.execute("DROP TABLE IF EXISTS nothing_here")
    except psycopg.Error as exc:
        print("drop:", exc.sqlstate, flush=True)
time.sleep(600)
"""


async def job_log(http: aiohttp.ClientSession, proc: PointsmanProcess, job: str) -> str:
    """The output of the job's first allocation so far ("" before it is placed)."""
    allocs = [a for a in await _allocs(http, proc.admin) if a["job"] == job]
    if not allocs:
        return ""
    async with http.get(proc.url(f"/allocations/{allocs[0]['id']}/logs?tail=0")) as resp:
        return await resp.text()


def identity_labels(alloc: dict[str, Any]) -> set[str]:
    """The identity labels the series of an allocation's traffic carry, as exposed."""
    return {f'app="{alloc["job"]}"', f'version="{alloc["version"]}"', f'instance="{alloc["id"]}"', 'node="local"'}


def labels_of(line: str) -> set[str]:
    """The name="value" pairs of one exposition line (values here hold no commas)."""
    return set(line[line.index("{") + 1 : line.rindex("}")].split(","))


def upstreams_platform(state: Path, pg: PgServer) -> dict[str, Any]:
    """A `pointsman up` with what the sidecars here point at: a TCP echo job, an HTTP job and a
    static `pg` service (the session's PostgreSQL)."""
    limits = {"cpu": 0.1, "memory": "64Mi"}
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "discovery": {
            "state_dir": str(state),
            "services": [
                {"name": "pg", "instances": [{"id": "pg-1", "address": "127.0.0.1", "ports": {"postgres": pg.port}}]}
            ],
        },
        "nodes": [{"name": "local", "reserved_ports": list(range(20000, PORT_BASE))}],
        "jobs": [
            {
                "name": "echo",
                "command": [sys.executable, "-c", ECHO],
                "ports": ["tcp"],
                "resources": limits,
                "health": {"port": "tcp", "interval": "0.2s", "grace": "5s"},
            },
            {
                "name": "web",
                "command": [sys.executable, "-m", "http.server", "${PORT_HTTP}", "--bind", "${HOST}"],
                "ports": ["http"],
                "resources": limits,
                "health": {"http": "/", "port": "http", "interval": "0.2s", "grace": "5s"},
            },
        ],
    }


def _config(state: Path, pg: PgServer, client_count: int = 1) -> dict[str, Any]:
    data = upstreams_platform(state, pg)
    data["policies"] = [{"name": "no-drop", "match": {"verbs": ["DROP"]}, "action": "deny"}]
    data["jobs"].append(
        {
            "name": "client",
            "command": [sys.executable, "-c", CLIENT, SUPERUSER, DATABASE],
            "count": client_count,
            "resources": {"cpu": 0.1, "memory": "64Mi"},
            "upstreams": [
                {"service": "echo", "protocol": "tcp"},
                {"service": "web", "protocol": "http"},
                {"service": "pg", "port": "postgres", "protocol": "postgres", "policies": ["no-drop"]},
            ],
            # Until echo and web pass their checks the router has no endpoint for them:
            # the client fails and is restarted, as an app started early would be.
            "restart": {"attempts": 30, "delay": "0.3s", "max_delay": "0.5s"},
        }
    )
    return data


async def test_sidecars_point_an_app_at_its_upstreams_with_its_identity(tmp_path: Path, pg_server: PgServer) -> None:
    config = tmp_path / "pointsman.yaml"
    data = _config(tmp_path / "state", pg_server)
    write_config(config, data)
    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:

        async def client_log() -> str:
            return await job_log(http, proc, "client")

        async def done() -> bool:
            return "drop:" in await client_log()

        await eventually(done, 30, "the client went through its three upstreams")
        (client,) = [a for a in await _allocs(http, proc.admin) if a["job"] == "client"]
        ports = client["ports"]
        log = await client_log()
        assert f"env 127.0.0.1:{ports['up-echo']} http://127.0.0.1:{ports['up-web']} 127.0.0.1:{ports['up-pg']}" in log
        assert "echo: ping" in log
        assert "web: 200" in log
        assert "pg: 1" in log
        assert "drop: 42501" in log  # the policy, applied in the client's own sidecar

        async with http.get(proc.url("/metrics")) as resp:
            metrics = await resp.text()
        # Identity from placement: the statements count under the job's name (not the user's),
        # with the instance's version, allocation and node; so do the HTTP requests.
        who = identity_labels(client)
        for series in ("pointsman_sql_statements_total{", "pointsman_http_requests_total{"):
            assert any(line.startswith(series) and who <= labels_of(line) for line in metrics.splitlines()), series
        # The sidecar's listener names the instance behind it, for joins in PromQL.
        info = [line for line in metrics.splitlines() if line.startswith("pointsman_sidecar_info{")]
        mine = [line for line in info if f'instance="{client["id"]}"' in line]
        assert len(mine) == 3 and all('app="client"' in line and 'node="local"' in line for line in mine), info
        # Sidecar ports are the client's own, not advertised in discovery.
        async with http.get(proc.url("/v1/services/client")) as resp:
            assert (await resp.json())["services"]["client"][0]["ports"] == {}

        # Scaled to zero: its sidecars go with it.
        data["jobs"][2]["count"] = 0
        write_config(config, data)
        async with http.post(proc.url("/reload")) as resp:
            assert resp.status == 200, await resp.text()

        async def sidecar_closed() -> bool:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", ports["up-echo"]), 1)
            except OSError:
                return True
            writer.close()
            await writer.wait_closed()
            return False

        await eventually(sidecar_closed, 10, "the sidecar listener closed")


REPORTER = """
import sys, time, urllib.request
import psycopg
with psycopg.connect(host=sys.argv[1], port=sys.argv[2], user=sys.argv[3], dbname=sys.argv[4], sslmode="disable",
                     application_name="not-me", connect_timeout=5, autocommit=True) as conn:
    for _ in range(3):
        conn.execute("SELECT 1")
for _ in range(2):
    urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[5]}/", timeout=5).read()
print("done", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(_netns_unavailable() is not None, reason=_netns_unavailable() or "")
async def test_a_shared_listener_knows_a_namespaced_client_by_its_address(tmp_path: Path, pg_server: PgServer) -> None:
    """No sidecar: the client has an address of its own, and the SQL listener maps it to the
    instance (and so the job) that owns it - over whatever application_name the client claims."""
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("0.0.0.0", 0))
            ports.append(sock.getsockname()[1])
    port, http_port = ports
    config = tmp_path / "pointsman.yaml"
    data = _config(tmp_path / "state", pg_server, client_count=0)
    data["clusters"] = {
        "pg": {"endpoints": [f"127.0.0.1:{pg_server.port}"]},
        "web": {"service": "web", "port": "http"},
    }
    data["listeners"] = [
        {"name": "shared-sql", "listen": f"0.0.0.0:{port}", "protocol": "postgres", "to": "pg"},
        {"name": "shared-http", "listen": f"0.0.0.0:{http_port}", "routes": [{"name": "all", "to": "web"}]},
    ]
    data["jobs"].append(
        {
            "name": "reporter",
            "command": [
                *(sys.executable, "-c", REPORTER, "10.213.0.1", str(port), SUPERUSER, DATABASE, str(http_port))
            ],
            "network": "namespace",
            "resources": {"cpu": 0.1, "memory": "64Mi"},
        }
    )
    write_config(config, data)
    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:

        async def reported() -> bool:
            async with http.get(proc.url("/metrics")) as resp:
                text = await resp.text()
            return any(
                line.startswith("pointsman_sql_statements_total")
                and 'app="reporter"' in line
                and 'verb="SELECT"' in line
                and line.endswith(" 3.0")
                for line in text.splitlines()
            )

        await eventually(reported, 30, "three SELECTs counted under the reporter job")
        (reporter,) = [a for a in await _allocs(http, proc.admin) if a["job"] == "reporter"]
        who = identity_labels(reporter)

        async def metrics() -> list[str]:
            async with http.get(proc.url("/metrics")) as resp:
                return (await resp.text()).splitlines()

        async def served() -> bool:
            return any(
                line.startswith("pointsman_http_requests_total{")
                and who | {'listener="shared-http"'} <= labels_of(line)
                and line.endswith(" 2.0")
                for line in await metrics()
            )

        await eventually(served, 10, "two HTTP requests counted under the reporter's instance")
        lines = await metrics()
        assert not any('app="not-me"' in line for line in lines)
        assert any(line.startswith("pointsman_sql_statements_total{") and who <= labels_of(line) for line in lines)


MY_CLIENT = """
import os, sys, time
import pymysql
host, port = os.environ["SHOPDB_ADDR"].split(":")
conn = pymysql.connect(host=host, port=int(port), user=sys.argv[1], password=sys.argv[2], database="test",
                       program_name="not-me", autocommit=True, connect_timeout=5)
with conn.cursor() as cur:
    cur.execute("SELECT 1")
    print("my:", cur.fetchone()[0], flush=True)
    try:
        cur.execute("DROP TABLE IF EXISTS nothing_here")
    except pymysql.MySQLError as exc:
        print("drop:", exc.args[0], flush=True)
time.sleep(600)
"""


async def test_a_mysql_sidecar_counts_and_polices_as_the_job(
    tmp_path: Path, pg_server: PgServer, mysql_server: MySqlServer
) -> None:
    """The same for MySQL: a `protocol: mysql` upstream, the app's program_name ignored."""
    config = tmp_path / "pointsman.yaml"
    data = upstreams_platform(tmp_path / "state", pg_server)
    data["discovery"]["services"].append(
        {"name": "shopdb", "instances": [{"id": "m-1", "address": "127.0.0.1", "ports": {"mysql": mysql_server.port}}]}
    )
    data["policies"] = [{"name": "no-drop", "match": {"verbs": ["DROP"]}, "action": "deny"}]
    data["jobs"].append(
        {
            "name": "shop",
            "command": [sys.executable, "-c", MY_CLIENT, APP_USER, APP_PASSWORD],
            "resources": {"cpu": 0.1, "memory": "64Mi"},
            "upstreams": [{"service": "shopdb", "port": "mysql", "protocol": "mysql", "policies": ["no-drop"]}],
        }
    )
    write_config(config, data)
    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:

        async def shop_log() -> str:
            return await job_log(http, proc, "shop")

        async def done() -> bool:
            return "drop:" in await shop_log()

        await eventually(done, 30, "the shop job went through its mysql sidecar")
        log = await shop_log()
        assert "my: 1" in log and "drop: 1142" in log, log
        (shop,) = [a for a in await _allocs(http, proc.admin) if a["job"] == "shop"]
        async with http.get(proc.url("/metrics")) as resp:
            lines = (await resp.text()).splitlines()
        who = identity_labels(shop) | {'protocol="mysql"'}
        assert any(line.startswith("pointsman_sql_statements_total{") and who <= labels_of(line) for line in lines)
        assert any(
            line.startswith("pointsman_sql_denied_total{") and who | {'rule="no-drop"'} <= labels_of(line)
            for line in lines
        )
        assert not any('app="not-me"' in line for line in lines)
