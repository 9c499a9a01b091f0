"""`pointsman up` with a discovery section: registry, API, DNS and a router that follows it,
in one real process; `pointsman dns` runs the registry and DNS alone."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.pointsman.harness import http_upstream, pointsman, replace_config, up_args, write_config

DNS_LINE = re.compile(r"pointsman: dns udp\+tcp (\S+):(\d+)$")
pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig (bind9-dnsutils) is not installed")


def _config(state: Path) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "discovery": {
            "state_dir": str(state),
            "dns": {"listen": "127.0.0.1:0", "domain": "internal", "ttl": "1s"},
            "services": [
                {"name": "db", "instances": [{"id": "db-1", "address": "127.0.0.7", "ports": {"postgres": 5432}}]}
            ],
        },
        "clusters": {"web": {"service": "web", "port": "http"}},
        "listeners": [
            {"name": "public", "listen": "127.0.0.1:0", "routes": [{"match": {"path_prefix": "/"}, "to": "web"}]}
        ],
    }


async def dig(port: str, *query: str) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        "dig", "@127.0.0.1", "-p", port, "+short", "+tries=1", "+time=2", *query, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return out.decode().split()


def _app(text: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return app


async def test_up_serves_registry_dns_and_follows_registrations(tmp_path: Path) -> None:
    config = tmp_path / "pointsman.yaml"
    write_config(config, _config(tmp_path / "state"))
    async with http_upstream(_app("hello from web-1")) as (host, web_port), pointsman(*up_args(config)) as proc:
        match = next(m for line in proc.lines if (m := DNS_LINE.search(line)))
        dns_port = match.group(2)
        assert await dig(dns_port, "db.svc.internal", "A") == ["127.0.0.7"]
        async with aiohttp.ClientSession() as http:
            async with http.get(proc.listener_url("public", "/")) as resp:
                assert resp.status == 503  # no web instance yet
            started = time.monotonic()
            body = {"address": host, "ports": {"http": web_port}}
            async with http.put(proc.url("/v1/services/web/instances/web-1"), json=body) as resp:
                assert resp.status == 200, await resp.text()
            async with http.get(proc.listener_url("public", "/")) as resp:
                assert (resp.status, await resp.text()) == (200, "hello from web-1")
            assert time.monotonic() - started < 1.0
            assert await dig(dns_port, "web.svc.internal", "A") == [host]
            srv = await dig(dns_port, "_http._tcp.web.svc.internal", "SRV")
            assert srv == ["0", "1", str(web_port), "web-1.web.svc.internal."]  # priority, weight, port, target
            async with http.get(proc.url("/metrics")) as resp:
                text = await resp.text()
            assert 'pointsman_registry_instances{health="passing",service="web"} 1.0' in text
            assert "pointsman_dns_queries_total" in text


async def test_a_restart_keeps_registrations_and_dns_runs_alone(tmp_path: Path) -> None:
    config = tmp_path / "pointsman.yaml"
    write_config(config, _config(tmp_path / "state"))
    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:
        body = {"address": "127.0.0.9", "ports": {"http": 8080}, "tags": ["canary"]}
        async with http.put(proc.url("/v1/services/web/instances/web-9"), json=body) as resp:
            assert resp.status == 200
    # The same state directory, `pointsman dns` this time: the registration is still there.
    async with pointsman("dns", "--config", str(config)) as proc:
        assert proc.listeners == {}  # no router
        match = next(m for line in proc.lines if (m := DNS_LINE.search(line)))
        assert await dig(match.group(2), "canary.web.svc.internal", "A") == ["127.0.0.9"]
        assert await dig(match.group(2), "web-9.web.svc.internal", "A") == ["127.0.0.9"]


async def test_reload_changes_static_services_and_the_dns_server(tmp_path: Path) -> None:
    config = tmp_path / "pointsman.yaml"
    data = _config(tmp_path / "state")
    write_config(config, data)
    async with pointsman(*up_args(config, "--no-watch")) as proc, aiohttp.ClientSession() as http:
        match = next(m for line in proc.lines if (m := DNS_LINE.search(line)))
        port = match.group(2)
        data["discovery"]["services"] = [
            {"name": "cache", "instances": [{"id": "cache-1", "address": "127.0.0.8", "ports": {"redis": 6379}}]}
        ]
        data["discovery"]["dns"] = {**data["discovery"]["dns"], "listen": f"127.0.0.1:{port}", "ttl": "7s"}
        replace_config(config, data)
        async with http.post(proc.url("/reload")) as resp:
            assert resp.status == 200, await resp.text()
        assert await dig(port, "cache.svc.internal", "A") == ["127.0.0.8"]
        assert await dig(port, "db.svc.internal", "A") == []  # removed from the config: gone
        proc_out = await asyncio.create_subprocess_exec(
            "dig", "@127.0.0.1", "-p", port, "+noall", "+answer", "cache.svc.internal", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc_out.communicate()
        assert "\t7\tIN\tA\t127.0.0.8" in out.decode()  # the new ttl
