"""The ``pointsman`` command as a user runs it: real processes, real sockets.

Tests marked ``dataplane`` pass traffic through the router's listeners; the rest need only
the admin API and the config code.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pointsman.cli import build_parser
from pointsman.config import json_schema, load_file, parse_config
from tests.pointsman.harness import (
    eventually,
    http_upstream,
    pointsman,
    replace_config,
    run_cli,
    up_args,
    write_config,
)

CONFIGS = Path(__file__).parents[2] / "configs"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def _digest(config: dict[str, Any]) -> str:
    return parse_config(config).digest()


# -- offline commands ---------------------------------------------------------------------


async def test_check_config_ok() -> None:
    files = sorted(CONFIGS.glob("*.yaml"))
    code, out, err = await run_cli("check-config", *map(str, files))
    assert code == 0, err
    for path in files:
        config = load_file(path)
        assert (
            f"{path}: ok ({len(config.listeners)} listeners, {len(config.clusters)} clusters, hash {config.digest()})"
            in out.splitlines()
        )


async def test_check_config_reports_every_error_with_file_and_path(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(
        """
clusters: {web: {endpoints: [127.0.0.1:1]}}
listeners:
  - name: public
    listen: 127.0.0.1:8080
    routes:
      - {match: {path_prefix: /a}, to: web}
      - {match: {path_prefix: /}, split: [{to: nope, weight: 1}]}
"""
    )
    typos = tmp_path / "typos.yaml"
    typos.write_text("clusters: {web: {endpoints: [127.0.0.1:1], connect_timeout: soon, balancr: random}}\n")
    good = CONFIGS / "default.yaml"
    code, out, err = await run_cli("check-config", str(unknown), str(good), str(typos))
    assert code == 1
    assert f"{good}: ok (" in out  # files after a bad one are still checked
    assert f"{unknown}: listeners[0].routes[1].split[0].to: unknown cluster 'nope' (known: web)" in err
    assert f"{typos}: invalid config (2 problems)" in err
    assert f"{typos}: clusters.web.connect_timeout: 'soon' is not a duration" in err
    assert f"{typos}: clusters.web.balancr: unknown key" in err
    assert "Traceback" not in err


async def test_check_config_yaml_syntax_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("admin:\n  listen: [127.0.0.1:9901\n")
    code, _, err = await run_cli("check-config", str(bad))
    assert code == 1
    assert f"{bad}: line 3, column 1: YAML syntax error" in err


async def test_schema_command_prints_the_schema() -> None:
    code, out, _ = await run_cli("schema")
    assert code == 0
    assert json.loads(out) == json_schema()


async def test_up_with_an_invalid_config_prints_errors_and_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("admin: {listen: 127.0.0.1:0}\nlisteners: [{name: x, listen: nowhere, to: c, protocol: tcp}]\n")
    code, out, err = await run_cli("up", "--config", str(config))
    assert code == 1
    assert f"{config}: listeners[0].listen: 'nowhere' is not host:port" in err
    assert "Traceback" not in err + out


async def test_up_when_the_admin_port_is_taken(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        config = tmp_path / "c.yaml"
        write_config(config, {"admin": {"listen": f"127.0.0.1:{taken.getsockname()[1]}"}})
        code, out, err = await run_cli("up", "--config", str(config))
    finally:
        taken.close()
    assert code == 1
    assert f"{config}: admin.listen: cannot start the admin:" in err
    assert "Traceback" not in err + out


async def test_reload_of_an_unreachable_instance(tmp_path: Path, closed_port: int) -> None:
    code, _, err = await run_cli("reload", "--admin", f"127.0.0.1:{closed_port}")
    assert code == 1
    assert f"127.0.0.1:{closed_port}/reload: cannot reach the admin API" in err
    # --config: the admin address comes from the file, even when the file is now invalid.
    config = tmp_path / "c.yaml"
    config.write_text(f"admin: {{listen: 127.0.0.1:{closed_port}}}\nbogus: 1\n")
    code, _, err = await run_cli("reload", "--config", str(config))
    assert code == 1
    assert f"127.0.0.1:{closed_port}/reload: cannot reach the admin API" in err


def test_log_level_goes_before_or_after_the_command() -> None:
    parser = build_parser()
    assert not hasattr(parser.parse_args(["schema"]), "log_level")  # main() defaults it to info
    assert parser.parse_args(["--log-level", "debug", "schema"]).log_level == "debug"
    assert parser.parse_args(["schema", "--log-level", "error"]).log_level == "error"
    assert parser.parse_args(["--log-level", "debug", "check-config", "f.yaml"]).log_level == "debug"
    args = parser.parse_args(["up", "--config", "c.yaml"])
    assert (args.drain_timeout, args.watch_interval, args.no_watch) == (10.0, 0.5, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["reload", "--admin", "127.0.0.1:1", "--config", "c.yaml"])  # one or the other


# -- a running instance without listeners (admin API only) ----------------------------------


def _admin_only(*cluster_names: str) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "clusters": {name: {"endpoints": ["127.0.0.1:1"]} for name in cluster_names},
    }


async def test_admin_api_reloads_and_shutdown(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    config_path = tmp_path / "pointsman.yaml"
    v1 = _admin_only("alpha")
    write_config(config_path, v1)
    async with pointsman(*up_args(config_path, "--no-watch")) as proc:
        async with session.get(proc.url("/healthz")) as r:
            assert (r.status, await r.text()) == (200, "ok\n")
        async with session.get(proc.url("/readyz")) as r:
            assert r.status == 200
        async with session.get(proc.url("/config")) as r:
            body = await r.json()
        assert body["file"] == str(config_path)
        assert body["hash"] == _digest(v1)
        assert body["config"]["clusters"]["alpha"]["endpoints"] == ["127.0.0.1:1"]
        async with session.get(proc.url("/clusters")) as r:
            clusters = await r.json()
        [endpoint] = clusters["alpha"]["endpoints"]
        assert endpoint["address"] == "127.0.0.1:1"
        assert endpoint["healthy"] is True and endpoint["ejected"] is False
        async with session.get(proc.url("/metrics")) as r:
            metrics = await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        assert f'pointsman_config_info{{hash="{_digest(v1)}"}} 1.0' in metrics
        assert "process_resident_memory_bytes" in metrics  # the process collector
        assert "python_info" in metrics  # the platform collector

        # Unchanged file: a no-op, through the API and through the CLI.
        async with session.post(proc.url("/reload")) as r:
            assert (r.status, await r.json()) == (200, {"status": "unchanged", "hash": _digest(v1)})
        code, out, _ = await run_cli("reload", "--admin", proc.admin)
        assert code == 0
        assert out.strip() == f"unchanged (hash {_digest(v1)})"

        # SIGHUP after an edit applies the new config.
        v2 = _admin_only("alpha", "beta")
        write_config(config_path, v2)
        mark = len(proc.lines)
        proc.send_signal(signal.SIGHUP)
        await proc.wait_for(re.compile(r"reload \(SIGHUP\): config \w+ -> \w+"), after=mark)
        async with session.get(proc.url("/clusters")) as r:
            assert set(await r.json()) == {"alpha", "beta"}

        # An invalid file is refused with its errors; the running config stays.
        config_path.write_text("admin: {listen: 127.0.0.1:0}\nclusters: {gamma: {endpoints: [nowhere]}}\n")
        async with session.post(proc.url("/reload")) as r:
            assert r.status == 400
            refused = await r.json()
        assert refused == {
            "status": "refused",
            "hash": _digest(v2),
            "file": str(config_path),
            "errors": [
                {"path": "clusters.gamma.endpoints[0]", "reason": "'nowhere' is not host:port, e.g. 127.0.0.1:8080"}
            ],
        }
        code, out, err = await run_cli("reload", "--admin", proc.admin)
        assert code == 1
        assert f"{config_path}: clusters.gamma.endpoints[0]: 'nowhere' is not host:port" in err
        async with session.get(proc.url("/config")) as r:
            assert (await r.json())["hash"] == _digest(v2)
        async with session.get(proc.url("/metrics")) as r:
            metrics = await r.text()
        assert "pointsman_config_reload_failures_total 2.0" in metrics
        assert 'pointsman_config_reloads_total{result="failure"} 2.0' in metrics
        assert 'pointsman_config_reloads_total{result="success"} 1.0' in metrics
        assert 'pointsman_config_reloads_total{result="unchanged"} 2.0' in metrics
        assert f'pointsman_config_info{{hash="{_digest(v2)}"}} 1.0' in metrics
        assert "clusters.gamma.endpoints[0]: 'nowhere' is not host:port" in proc.output  # logged too

        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit() == 0
        assert "Traceback" not in proc.output


async def test_router_command_serves_the_admin_api_and_stops_on_sigterm(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    config_path = tmp_path / "pointsman.yaml"
    write_config(config_path, _admin_only("alpha"))
    async with pointsman("router", "--config", str(config_path), "--drain-timeout", "1") as proc:
        async with session.get(proc.url("/clusters")) as r:
            assert set(await r.json()) == {"alpha"}
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit() == 0
    assert "draining: waiting up to 1.0s" in proc.output


async def test_file_watcher_picks_up_in_place_edits_and_atomic_renames(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    config_path = tmp_path / "pointsman.yaml"
    write_config(config_path, _admin_only("alpha"))
    async with pointsman(*up_args(config_path, "--watch-interval", "0.1")) as proc:

        async def running(config: dict[str, Any]) -> bool:
            async with session.get(proc.url("/config")) as r:
                return bool((await r.json())["hash"] == _digest(config))

        renamed = _admin_only("alpha", "renamed")
        replace_config(config_path, renamed)
        await eventually(lambda: running(renamed), what="the renamed file to be applied")

        edited = _admin_only("edited")
        write_config(config_path, edited)
        await eventually(lambda: running(edited), what="the edited file to be applied")
        async with session.get(proc.url("/clusters")) as r:
            assert set(await r.json()) == {"edited"}

        proc.send_signal(signal.SIGINT)
        assert await proc.wait_exit() == 0
    assert "reload (file change)" in proc.output


# -- traffic through the router --------------------------------------------------------------


class Upstream:
    """An aiohttp server that answers every path with its name and the path, plus /slow."""

    def __init__(self) -> None:
        self.slow_started = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/slow", self.slow)
        self.app.router.add_route("*", "/{tail:.*}", self.echo)

    async def echo(self, request: web.Request) -> web.Response:
        return web.Response(text=f"upstream {request.path}")

    async def slow(self, request: web.Request) -> web.Response:
        self.slow_started.set()
        await asyncio.sleep(1.0)
        return web.Response(text="slow done")


def _routed(upstream: tuple[str, int], *prefixes: str) -> dict[str, Any]:
    host, port = upstream
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "clusters": {"app": {"endpoints": [f"{host}:{port}"]}},
        "listeners": [
            {
                "name": "public",
                "listen": "127.0.0.1:0",
                "routes": [{"match": {"path_prefix": p}, "to": "app"} for p in prefixes],
            }
        ],
    }


@pytest.mark.dataplane
async def test_up_routes_reloads_and_drains(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    upstream = Upstream()
    async with http_upstream(upstream.app) as address:
        config_path = tmp_path / "pointsman.yaml"
        write_config(config_path, _routed(address, "/v1", "/slow"))
        async with pointsman(*up_args(config_path, "--no-watch")) as proc:
            assert set(proc.listeners) == {"public"}
            async with session.get(proc.listener_url("public", "/v1/x")) as r:
                assert (r.status, await r.text()) == (200, "upstream /v1/x")
            async with session.get(proc.listener_url("public", "/v2/x")) as r:
                assert r.status == 404  # no route

            # SIGHUP after an in-place edit: the new route serves, on the same port.
            write_config(config_path, _routed(address, "/v1", "/v2", "/slow"))
            mark = len(proc.lines)
            proc.send_signal(signal.SIGHUP)
            await proc.wait_for(re.compile(r"reload \(SIGHUP\): config"), after=mark)
            line = await proc.wait_for(re.compile(r"pointsman: listener public http (\S+)$"), after=mark)
            assert line.group(1) == proc.listeners["public"]
            async with session.get(proc.listener_url("public", "/v2/x")) as r:
                assert (r.status, await r.text()) == (200, "upstream /v2/x")

            # `pointsman reload` of an invalid file: exit 1 with the errors, old routes serve.
            bad = _routed(address, "/v3")
            bad["listeners"][0]["routes"][0]["to"] = "missing"
            write_config(config_path, bad)
            code, _, err = await run_cli("reload", "--admin", proc.admin)
            assert code == 1
            assert f"{config_path}: listeners[0].routes[0].to: unknown cluster 'missing'" in err
            async with session.get(proc.listener_url("public", "/v2/x")) as r:
                assert r.status == 200
            async with session.get(proc.url("/metrics")) as r:
                assert "pointsman_config_reload_failures_total 1.0" in await r.text()

            # SIGTERM with a slow request in flight: readiness goes 503, new connections are
            # refused, the request in flight completes, and the process exits 0.
            slow = asyncio.create_task(session.get(proc.listener_url("public", "/slow")))
            try:
                async with asyncio.timeout(5):
                    await upstream.slow_started.wait()
                proc.send_signal(signal.SIGTERM)

                async def not_ready() -> bool:
                    async with session.get(proc.url("/readyz")) as r:
                        return r.status == 503

                await eventually(not_ready, what="/readyz to answer 503 while draining")
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
                    with pytest.raises(aiohttp.ClientConnectionError):
                        async with fresh.get(proc.listener_url("public", "/v1/x")) as r:
                            pytest.fail(f"a draining listener accepted a new connection: {r.status}")
                response = await slow
                async with response:
                    assert (response.status, await response.text()) == (200, "slow done")
            finally:
                if not slow.done():
                    slow.cancel()
                await asyncio.gather(slow, return_exceptions=True)
            assert await proc.wait_exit() == 0
            assert "Traceback" not in proc.output
