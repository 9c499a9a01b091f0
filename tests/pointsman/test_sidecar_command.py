"""`pointsman sidecar --app NAME`, end to end with real processes: a `pointsman up` runs the
registry with a TCP echo job, an HTTP job and a static `pg` service (the session's real
PostgreSQL); a second process, the sidecar, follows that registry over HTTP and gives an app
it does not run local listeners for them, printed as env lines."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from tests.pgserver import DATABASE, SUPERUSER, PgServer
from tests.pointsman.harness import eventually, pointsman, run_cli, up_args, write_config
from tests.pointsman.test_scheduler_up import _allocs, _pid
from tests.pointsman.test_sidecars import upstreams_platform

ENV_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)=(\S+)$")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sidecar_config(registry: str, pg_port: int) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "policies": [{"name": "no-drop", "match": {"verbs": ["DROP"]}, "action": "deny"}],
        "sidecars": [
            {
                "app": "billing",
                "version": "2.3",
                "instance": "billing@host-7",
                "node": "rack-2",
                "registry": registry,
                "upstreams": [
                    {"service": "echo", "port": "tcp"},
                    {"service": "web", "port": "http", "protocol": "http"},
                    {
                        "service": "pg",
                        "port": "postgres",
                        "protocol": "postgres",
                        "policies": ["no-drop"],
                        "local_port": pg_port,
                        "env": "DB_ADDR",
                    },
                ],
            }
        ],
    }


async def _echo(addr: str) -> str:
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    try:
        writer.write(b"ping")
        await writer.drain()
        return (await asyncio.wait_for(reader.read(100), 5)).decode()
    finally:
        writer.close()


def _sql(addr: str) -> tuple[int, str | None]:
    """SELECT 1, then a DROP the sidecar's policy denies: (the row, the DROP's SQLSTATE)."""
    host, port = addr.rsplit(":", 1)
    with psycopg.connect(
        host=host, port=port, user=SUPERUSER, dbname=DATABASE, sslmode="disable", connect_timeout=5, autocommit=True
    ) as conn:
        row = conn.execute("SELECT 1").fetchone()
        assert row is not None
        try:
            conn.execute("DROP TABLE IF EXISTS nothing_here")
        except psycopg.Error as exc:
            return int(row[0]), exc.sqlstate
        return int(row[0]), None


async def _status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status


async def test_sidecar_follows_a_remote_registry(tmp_path: Path, pg_server: PgServer) -> None:
    up_file = tmp_path / "up.yaml"
    up_data = upstreams_platform(tmp_path / "state", pg_server)
    write_config(up_file, up_data)
    orphans: list[int] = []
    try:
        async with pointsman(*up_args(up_file)) as up, aiohttp.ClientSession() as http:

            async def passing() -> bool:
                async with http.get(up.url("/v1/services")) as resp:
                    services = (await resp.json())["services"]
                return all(any(i["health"] == "passing" for i in services.get(name, [])) for name in ("echo", "web"))

            await eventually(passing, 30, "echo and web passing in the registry")
            side_file = tmp_path / "sidecar.yaml"
            pg_port = _free_port()
            write_config(side_file, _sidecar_config(up.admin, pg_port))
            async with pointsman("sidecar", "--app", "billing", "--config", str(side_file)) as side:
                env: dict[str, str] = {}
                after = 0
                for _ in range(3):
                    match = await side.wait_for(ENV_LINE, after=after)
                    after = side.lines.index(match.string) + 1
                    env[match.group(1)] = match.group(2)
                assert env["DB_ADDR"] == f"127.0.0.1:{pg_port}"  # fixed
                assert re.fullmatch(r"127\.0\.0\.1:\d+", env["ECHO_ADDR"])  # auto
                assert re.fullmatch(r"http://127\.0\.0\.1:\d+", env["WEB_URL"])
                assert "registry http://" + up.admin in side.output and "connected" in side.output

                assert await _echo(env["ECHO_ADDR"]) == "ping"
                assert await _status(http, env["WEB_URL"] + "/") == 200
                assert await asyncio.to_thread(_sql, env["DB_ADDR"]) == (1, "42501")
                async with http.get(side.url("/metrics")) as resp:
                    metrics = (await resp.text()).splitlines()
                # Counted and policed as the app named in the sidecar's config, with its labels.
                who = ('app="billing"', 'version="2.3"', 'instance="billing@host-7"', 'node="rack-2"')
                assert any(
                    line.startswith("pointsman_sql_statements_total")
                    and all(label in line for label in who)
                    and 'verb="SELECT"' in line
                    for line in metrics
                ), metrics
                assert any(
                    line.startswith("pointsman_http_requests_total") and all(label in line for label in who)
                    for line in metrics
                ), metrics
                assert any(
                    line.startswith("pointsman_sql_denied_total")
                    and 'app="billing"' in line
                    and 'rule="no-drop"' in line
                    for line in metrics
                ), metrics

                # A file change reloads: a new upstream gets a port, the others keep theirs.
                side_data = _sidecar_config(up.admin, pg_port)
                side_data["sidecars"][0]["upstreams"].append({"service": "later", "port": "tcp"})
                seen = len(side.lines)
                write_config(side_file, side_data)
                await side.wait_for(re.compile(r"sidecar billing: LATER_ADDR=127\.0\.0\.1:\d+$"), after=seen)
                await side.wait_for(re.compile(r"reload \(file change\): config"), after=seen)

                async def web_endpoints() -> list[Any]:
                    async with http.get(side.url("/clusters")) as resp:
                        return list((await resp.json())["upstream.web.http"]["endpoints"])

                assert len(await web_endpoints()) == 1

                # web scaled to zero in the up: the sidecar follows the registry.
                up_data["jobs"][1]["count"] = 0
                write_config(up_file, up_data)
                async with http.post(up.url("/reload")) as resp:
                    assert resp.status == 200, await resp.text()

                async def web_gone() -> bool:
                    # Gone from the catalog (not only refusing connections): no endpoints.
                    return await web_endpoints() == [] and await _status(http, env["WEB_URL"] + "/") == 503

                await eventually(web_gone, 10, "the sidecar's web upstream to answer 503")

                # The up dies (its echo task lives on): the sidecar keeps the last catalog.
                orphans += [_pid(a) for a in await _allocs(http, up.admin) if a["job"] == "echo"]
                seen = len(side.lines)
                up.proc.kill()
                await up.proc.wait()
                await side.wait_for(re.compile(r"registry http://\S+ lost .*last known catalog"), after=seen)
                assert await _echo(env["ECHO_ADDR"]) == "ping"

                side.send_signal(signal.SIGTERM)
                assert await side.wait_exit() == 0
    finally:
        for pid in orphans:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize(
    ("sidecars", "expected"),
    [
        (
            [{"app": "billing", "upstreams": [{"service": "pg", "port": "postgres", "policies": ["nope"]}]}],
            "sidecars[0].upstreams[0].policies[0]: unknown policy 'nope' (no-drop)",
        ),
        (
            [{"app": "billing"}, {"app": "billing", "registry": "127.0.0.1:9911"}],
            "sidecars[1].app: app 'billing' is also declared by sidecars[0]",
        ),
        (
            [{"app": "billing", "upstreams": [{"service": "pg"}]}],
            "sidecars[0].upstreams[0].port: required key is missing",
        ),
        (
            [{"app": "billing", "upstreams": [{"service": "pg", "port": "postgres", "local_port": "any"}]}],
            "sidecars[0].upstreams[0].local_port: a port (1-65535) or auto",
        ),
    ],
)
async def test_check_config_refuses_bad_sidecars(tmp_path: Path, sidecars: list[Any], expected: str) -> None:
    path = tmp_path / "sidecar.yaml"
    write_config(
        path, {"policies": [{"name": "no-drop", "match": {"verbs": ["DROP"]}, "action": "deny"}], "sidecars": sidecars}
    )
    code, out, err = await run_cli("check-config", str(path))
    assert code == 1, out
    assert f"{path}: {expected}" in err, err


async def test_sidecar_refuses_an_app_the_file_does_not_declare(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    write_config(path, {"sidecars": [{"app": "billing"}]})
    code, _, err = await run_cli("sidecar", "--app", "payroll", "--config", str(path))
    assert code == 1
    assert "no entry has app 'payroll' (billing)" in err, err
