"""A cluster that names a registry service follows the catalog without a reload."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from discovery.model import Catalog, Instance, Snapshot
from pointsman.config import parse_config
from router.listeners import Router
from tests.support import http_upstream


def _app(name: str, delay: float = 0.0) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return app


def _snapshot(revision: int, *instances: tuple[str, tuple[str, int], str]) -> Snapshot:
    items = tuple(
        Instance(id=iid, service="web", address=addr[0], ports={"http": addr[1]}, health=health)  # type: ignore[arg-type]
        for iid, addr, health in instances
    )
    return Snapshot(revision, {"web": items})


@asynccontextmanager
async def following_router(catalog: Catalog) -> AsyncIterator[int]:
    config = parse_config(
        {
            "clusters": {"web": {"service": "web", "port": "http"}},
            "listeners": [
                {"name": "in", "listen": "127.0.0.1:0", "routes": [{"match": {"path_prefix": "/"}, "to": "web"}]}
            ],
        }
    )
    router = Router(catalog=catalog)
    await router.apply(config.clusters, config.listeners)
    try:
        yield router.address_of("in")[1]
    finally:
        await router.close()


async def test_endpoints_follow_the_catalog_within_100ms() -> None:
    catalog = Catalog()
    async with http_upstream(_app("a")) as a, http_upstream(_app("b")) as b, following_router(catalog) as port:
        url = f"http://127.0.0.1:{port}/"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                assert resp.status == 503  # no instances yet
            catalog.publish(_snapshot(1, ("a", a, "passing")))
            started = time.monotonic()
            async with session.get(url) as resp:
                assert (resp.status, await resp.text()) == (200, "a")
            assert time.monotonic() - started < 0.1
            catalog.publish(_snapshot(2, ("a", a, "passing"), ("b", b, "passing")))
            seen = Counter()
            for _ in range(20):
                async with session.get(url) as resp:
                    seen[await resp.text()] += 1
            assert seen["a"] and seen["b"]
            # Critical instances are left out; warning ones only when nothing passes.
            catalog.publish(_snapshot(3, ("a", a, "critical"), ("b", b, "warning")))
            async with session.get(url) as resp:
                assert await resp.text() == "b"
            catalog.publish(_snapshot(4, ("a", a, "passing"), ("b", b, "warning")))
            for _ in range(5):
                async with session.get(url) as resp:
                    assert await resp.text() == "a"


async def test_an_instance_that_leaves_is_drained_not_cut() -> None:
    catalog = Catalog()
    async with (
        http_upstream(_app("slow", delay=0.5)) as slow,
        http_upstream(_app("fast")) as fast,
        following_router(catalog) as port,
    ):
        url = f"http://127.0.0.1:{port}/"
        catalog.publish(_snapshot(1, ("slow", slow, "passing")))
        async with aiohttp.ClientSession() as session:
            in_flight = asyncio.ensure_future(session.get(url))
            await asyncio.sleep(0.1)  # the request is at the slow instance now
            catalog.publish(_snapshot(2, ("fast", fast, "passing")))
            async with session.get(url) as resp:
                assert await resp.text() == "fast"  # new requests go to the new set at once
            resp = await in_flight
            assert (resp.status, await resp.text()) == (200, "slow")  # the old one finished
            resp.release()


async def test_no_failed_requests_while_instances_come_and_go() -> None:
    catalog = Catalog()
    async with (
        http_upstream(_app("a")) as a,
        http_upstream(_app("b")) as b,
        http_upstream(_app("c")) as c,
        following_router(catalog) as port,
    ):
        url = f"http://127.0.0.1:{port}/"
        catalog.publish(_snapshot(1, ("a", a, "passing")))
        failures: list[int] = []
        done = 0
        stop = asyncio.Event()

        async def client() -> None:
            nonlocal done
            async with aiohttp.ClientSession() as session:
                while not stop.is_set():
                    async with session.get(url) as resp:
                        await resp.read()
                        if resp.status != 200:
                            failures.append(resp.status)
                    done += 1

        clients = [asyncio.ensure_future(client()) for _ in range(8)]
        sets = [[("a", a)], [("a", a), ("b", b)], [("b", b)], [("b", b), ("c", c)], [("c", c)], [("a", a), ("c", c)]]
        for revision in range(2, 32):
            members = sets[revision % len(sets)]
            catalog.publish(_snapshot(revision, *((iid, addr, "passing") for iid, addr in members)))
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*clients)
        assert failures == []
        assert done > 100
