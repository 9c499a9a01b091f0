"""The registry over the real SQLite store: registrations, health, restart, the HTTP API."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web

from discovery.api import INDEX_HEADER, registry_routes
from discovery.registry import Registration, Registry
from discovery.store_sqlite import SqliteStore
from tests.support import http_upstream, wait_until


@asynccontextmanager
async def registry_on(path: str) -> AsyncIterator[Registry]:
    store = SqliteStore(path)
    await store.start()
    registry = Registry(store)
    await registry.start()
    try:
        yield registry
    finally:
        await registry.close()
        await store.close()


def reg(iid: str = "web-1", service: str = "web", port: int = 8080, **extra: object) -> Registration:
    return Registration.model_validate(
        {"id": iid, "service": service, "address": "127.0.0.1", "ports": {"http": port}, **extra}
    )


async def test_register_and_deregister_reach_the_catalog_at_once() -> None:
    async with registry_on(":memory:") as registry:
        started = time.monotonic()
        await registry.register(reg(tags=["blue"]))
        await wait_until(lambda: len(registry.snapshot.instances("web")) == 1, timeout=1.0)
        assert time.monotonic() - started < 0.1
        (instance,) = registry.snapshot.instances("web")
        assert (instance.id, instance.health, instance.tags, dict(instance.ports)) == (
            "web-1",
            "passing",
            ("blue",),
            {"http": 8080},
        )
        assert await registry.deregister("web", "web-1")
        await wait_until(lambda: registry.snapshot.instances("web") == (), timeout=1.0)
        assert not await registry.deregister("web", "web-1")


async def test_ttl_check_turns_critical_when_heartbeats_stop() -> None:
    async with registry_on(":memory:") as registry:
        await registry.register(reg(check={"ttl": 0.3}))
        await wait_until(lambda: len(registry.snapshot.instances("web")) == 1)
        assert registry.snapshot.instances("web")[0].health == "critical"  # not heartbeated yet
        assert registry.snapshot.usable("web") == ()
        for _ in range(4):  # heartbeats every 0.15 s keep it passing
            await registry.heartbeat("web", "web-1")
            await wait_until(lambda: registry.snapshot.instances("web")[0].health == "passing")
            await asyncio.sleep(0.15)
        await wait_until(lambda: registry.snapshot.instances("web")[0].health == "critical", timeout=2.0)


async def test_http_check_follows_the_instance() -> None:
    healthy = True

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=200 if healthy else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    async with http_upstream(app) as (_, port), registry_on(":memory:") as registry:
        await registry.register(reg(port=port, check={"http": "/healthz", "interval": 0.1, "timeout": 0.5}))
        await wait_until(lambda: [i.health for i in registry.snapshot.instances("web")] == ["passing"], timeout=3.0)
        healthy = False
        await wait_until(lambda: [i.health for i in registry.snapshot.instances("web")] == ["critical"], timeout=3.0)
        assert "503" in registry.describe("web")["services"]["web"][0]["output"]


async def test_a_restart_on_the_same_file_keeps_everything(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    async with registry_on(path) as registry:
        await registry.register(reg("web-1"))
        await registry.register(reg("web-2", port=8081))
        await registry.set_health("web", "web-2", "warning", "slow")
        await wait_until(lambda: len(registry.snapshot.instances("web")) == 2)
        await wait_until(lambda: registry.snapshot.instances("web")[1].health == "warning")
        before = registry.describe()
    async with registry_on(path) as registry:
        assert registry.describe() == before
        revision = await registry.register(reg("web-3", port=8082))
        assert revision > before["revision"]


async def test_static_services_follow_the_config() -> None:
    async with registry_on(":memory:") as registry:
        await registry.register(reg("api-1", service="api"))  # registered by the API: left alone
        await registry.sync_static(
            [reg("db-1", service="db", source="config"), reg("db-2", service="db", source="config")]
        )
        await wait_until(lambda: len(registry.snapshot.instances("db")) == 2)
        await registry.sync_static([reg("db-2", service="db", source="config")])
        await wait_until(lambda: [i.id for i in registry.snapshot.instances("db")] == ["db-2"])
        assert [i.id for i in registry.snapshot.instances("api")] == ["api-1"]


# --- the HTTP API ------------------------------------------------------------------------------


@asynccontextmanager
async def api(registry: Registry) -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes(registry_routes(registry))
    async with http_upstream(app) as (host, port):
        yield f"http://{host}:{port}"


async def test_api_register_list_blocking_query_and_deregister() -> None:
    async with registry_on(":memory:") as registry, api(registry) as base, aiohttp.ClientSession() as http:
        url = f"{base}/v1/services/web/instances/web-1"
        async with http.put(url, json={"address": "127.0.0.1", "ports": {"http": 8080}, "tags": ["v2"]}) as resp:
            assert resp.status == 200, await resp.text()
        async with http.get(f"{base}/v1/services/web") as resp:
            body = await resp.json()
            index = int(resp.headers[INDEX_HEADER])
        assert [i["id"] for i in body["services"]["web"]] == ["web-1"]
        # A blocking query returns when something changes, not before.
        waiting = asyncio.ensure_future(http.get(f"{base}/v1/services/web?index={index}&wait=10s"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        async with http.delete(url) as resp:
            assert resp.status == 200
        resp = await asyncio.wait_for(waiting, 2.0)
        assert (await resp.json())["services"]["web"] == []
        assert int(resp.headers[INDEX_HEADER]) > index
        resp.release()
        async with http.delete(url) as resp:
            assert resp.status == 404


async def test_api_validation_errors_name_the_field() -> None:
    async with registry_on(":memory:") as registry, api(registry) as base, aiohttp.ClientSession() as http:
        url = f"{base}/v1/services/web/instances/web-1"
        cases = [
            ({"address": "not-an-ip"}, "address"),
            ({"address": "127.0.0.1", "ports": {"http": 70000}}, "ports"),
            ({"address": "127.0.0.1", "colour": "red"}, "colour"),
            ({"address": "127.0.0.1", "check": {"ttl": 5, "http": "/x"}}, "check"),
            ({"ports": {"http": 80}}, "address"),
        ]
        for body, field in cases:
            async with http.put(url, json=body) as resp:
                assert resp.status == 400
                errors = (await resp.json())["errors"]
                assert any(e["path"].startswith(field) for e in errors), (body, errors)
        async with http.put(url, data=b"{nope") as resp:
            assert resp.status == 400
        async with http.put(f"{base}/v1/services/bad_name!/instances/x", json={"address": "127.0.0.1"}) as resp:
            assert resp.status == 400


async def test_api_heartbeat_and_sse_watch() -> None:
    async with registry_on(":memory:") as registry, api(registry) as base, aiohttp.ClientSession() as http:
        url = f"{base}/v1/services/job/instances/job-1"
        async with http.put(url, json={"address": "127.0.0.1", "check": {"ttl": 5}}) as resp:
            assert resp.status == 200
        async with http.get(f"{base}/v1/watch") as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")

            async def next_catalog() -> dict[str, object]:
                while True:
                    line = (await stream.content.readline()).decode()
                    if line.startswith("data: "):
                        return json.loads(line[6:])  # type: ignore[no-any-return]

            first = await asyncio.wait_for(next_catalog(), 2.0)
            assert first["services"]["job"][0]["health"] == "critical"  # type: ignore[index]
            async with http.put(f"{url}/heartbeat", json={"status": "passing", "output": "ok"}) as resp:
                assert resp.status == 200
            second = await asyncio.wait_for(next_catalog(), 2.0)
            assert second["services"]["job"][0]["health"] == "passing"  # type: ignore[index]
        async with http.put(f"{base}/v1/services/job/instances/nope/heartbeat") as resp:
            assert resp.status == 404


async def test_router_follows_registrations_under_load_without_failures() -> None:
    """Registrations and deregistrations through the registry (store → watch → catalog) while
    8 clients send requests through a router whose cluster follows the service."""
    from pointsman.config import parse_config
    from router.listeners import Router

    def app(name: str) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            return web.Response(text=name)

        application = web.Application()
        application.router.add_get("/", handle)
        return application

    config = parse_config(
        {
            "clusters": {"web": {"service": "web", "port": "http"}},
            "listeners": [
                {"name": "in", "listen": "127.0.0.1:0", "routes": [{"match": {"path_prefix": "/"}, "to": "web"}]}
            ],
        }
    )
    async with (
        registry_on(":memory:") as registry,
        http_upstream(app("a")) as (_, port_a),
        http_upstream(app("b")) as (_, port_b),
    ):
        router = Router(catalog=registry.catalog)
        await router.apply(config.clusters, config.listeners)
        try:
            await registry.register(reg("a", port=port_a))
            await wait_until(lambda: len(registry.snapshot.usable("web")) == 1)
            url = f"http://127.0.0.1:{router.address_of('in')[1]}/"
            failures: list[int] = []
            seen: set[str] = set()
            stop = asyncio.Event()

            async def client() -> None:
                async with aiohttp.ClientSession() as session:
                    while not stop.is_set():
                        async with session.get(url) as resp:
                            seen.add(await resp.text())
                            if resp.status != 200:
                                failures.append(resp.status)

            clients = [asyncio.ensure_future(client()) for _ in range(8)]
            for _ in range(5):
                await registry.register(reg("b", port=port_b))  # b joins before a leaves
                await asyncio.sleep(0.1)
                await registry.deregister("web", "a")
                await asyncio.sleep(0.1)
                await registry.register(reg("a", port=port_a))
                await asyncio.sleep(0.1)
                await registry.deregister("web", "b")
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*clients)
            assert failures == []
            assert seen == {"a", "b"}
        finally:
            await router.close()
