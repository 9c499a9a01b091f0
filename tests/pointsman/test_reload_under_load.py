"""Reloads under load: 20 config swaps while clients keep requesting, and not one request fails.

In-process: the real Supervisor (router + admin) and real aiohttp upstreams and clients. The
two configs move route ``/x`` between clusters, add/remove a route and a cluster, and keep
the listener's address, which is the case the router must handle without refusing or
dropping a connection.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pointsman.config import parse_config
from pointsman.supervisor import RouterComponent, build_supervisor
from router.config import format_address
from tests.pointsman.harness import http_upstream, write_config

CLIENTS = 6
RELOADS = 20
REQUESTS_BETWEEN_RELOADS = 15


def _named(name: str) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return app


def _configs(blue: tuple[str, int], green: tuple[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    listener = {"name": "public", "listen": "127.0.0.1:0"}
    a = {
        "admin": {"listen": "127.0.0.1:0"},
        "clusters": {"blue": {"endpoints": [format_address(blue)]}},
        "listeners": [
            {
                **listener,
                "routes": [
                    {"match": {"path_prefix": "/only-a"}, "to": "blue"},
                    {"match": {"path_prefix": "/x"}, "to": "blue"},
                ],
            }
        ],
    }
    b = {
        "admin": {"listen": "127.0.0.1:0"},
        # blue is rebuilt (its config changed) and green appears; in config a green is gone.
        "clusters": {
            "green": {"endpoints": [format_address(green)]},
            "blue": {"endpoints": [format_address(blue)], "balancer": "least_request"},
        },
        "listeners": [
            {
                **listener,
                "routes": [
                    {"match": {"path_prefix": "/x"}, "to": "green"},
                    {"match": {"path_prefix": "/only-b"}, "to": "blue"},
                ],
            }
        ],
    }
    return a, b


@dataclass
class Outcome:
    status: int
    body: str
    generation: int  # completed reloads when the request was sent
    quiet: bool  # no reload ran from before it was sent until after it was answered


@pytest.mark.dataplane
async def test_twenty_reloads_under_load_lose_no_request(tmp_path: Path) -> None:
    async with http_upstream(_named("blue")) as blue, http_upstream(_named("green")) as green:
        config_a, config_b = _configs(blue, green)
        path = tmp_path / "pointsman.yaml"
        write_config(path, config_a)
        supervisor = build_supervisor(parse_config(config_a), path, handle_signals=False, watch_interval=None)
        await supervisor.start()
        router_component = supervisor.component("router")
        assert isinstance(router_component, RouterComponent)
        address = format_address(router_component.router.address_of("public"))

        outcomes: list[Outcome] = []
        generation = 0
        reloading = False
        stop = asyncio.Event()

        async def client(session: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                sent_generation, sent_quiet = generation, not reloading
                async with session.get(f"http://{address}/x") as response:
                    body = await response.text()
                quiet = sent_quiet and not reloading and generation == sent_generation
                outcomes.append(Outcome(response.status, body, sent_generation, quiet))

        async def answered_since(count: int) -> None:
            async with asyncio.timeout(10):
                while len(outcomes) < count + REQUESTS_BETWEEN_RELOADS:
                    await asyncio.sleep(0.005)

        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with asyncio.TaskGroup() as group:
                    for _ in range(CLIENTS):
                        group.create_task(client(session))
                    try:
                        started = time.monotonic()
                        for i in range(1, RELOADS + 1):
                            await answered_since(len(outcomes))
                            write_config(path, config_b if i % 2 else config_a)
                            reloading = True
                            result = await supervisor.reload(f"test {i}")
                            generation, reloading = i, False
                            assert result.status == "reloaded", result
                        await answered_since(len(outcomes))
                        elapsed = time.monotonic() - started
                    finally:
                        stop.set()

                # 20 reloads: the last one applied config a.
                async with session.get(f"http://{address}/only-a") as r:
                    assert (r.status, await r.text()) == (200, "blue")
                async with session.get(f"http://{address}/only-b") as r:
                    assert r.status == 404
        finally:
            await supervisor.shutdown()

    failed = [o for o in outcomes if o.status != 200 or o.body not in ("blue", "green")]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed, e.g. {failed[:3]}"
    # A request that no reload overlapped was routed by the config of its generation.
    wrong = [o for o in outcomes if o.quiet and o.body != ("green" if o.generation % 2 else "blue")]
    assert not wrong, f"{len(wrong)} requests routed by a stale table, e.g. {wrong[:3]}"
    assert sum(o.quiet for o in outcomes) > RELOADS  # the check above did check something
    assert sum(not o.quiet for o in outcomes) > RELOADS  # and requests were in flight during reloads
    assert supervisor.stats.reloads.get(("success",)) == RELOADS
    assert len(outcomes) >= RELOADS * REQUESTS_BETWEEN_RELOADS, elapsed
