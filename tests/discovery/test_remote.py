"""RemoteCatalog: a catalog that follows a registry's HTTP API, through its outages."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from aiohttp import web

from discovery.model import Catalog
from discovery.remote import RemoteCatalog, parse_services
from tests.pointsman.harness import eventually


def _body(revision: int, **services: list[str]) -> dict[str, Any]:
    return {
        "revision": revision,
        "services": {
            name: [{"id": i, "address": "127.0.0.1", "ports": {"tcp": 7000 + n}} for n, i in enumerate(ids)]
            for name, ids in services.items()
        },
    }


class FakeRegistry:
    """``GET /v1/services`` with blocking queries, answering ``self.body``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.body = _body(1, echo=["echo-1"])
        self.changed = asyncio.Event()
        self.runner: web.AppRunner | None = None

    def set(self, body: dict[str, Any]) -> None:
        self.body = body
        self.changed.set()
        self.changed = asyncio.Event()

    async def services(self, request: web.Request) -> web.Response:
        index = request.query.get("index")
        if index is not None and self.body["revision"] <= int(index):
            wait = float(request.query.get("wait", "30s").rstrip("s"))
            try:
                await asyncio.wait_for(self.changed.wait(), wait)
            except TimeoutError:
                pass
        return web.json_response(self.body)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/services", self.services)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ids(catalog: Catalog, service: str) -> list[str]:
    return [i.id for i in catalog.snapshot.instances(service)]


async def test_follows_changes_keeps_the_last_catalog_while_down_and_reconnects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="pointsman.remote")
    port = _free_port()
    registry = FakeRegistry(port)
    catalog = Catalog()
    follower = RemoteCatalog(f"http://127.0.0.1:{port}", catalog, wait=1.0)
    follower.start()
    try:
        # Down at first: retried until it answers.
        await asyncio.sleep(0.5)
        assert not follower.synced.is_set() and catalog.snapshot.revision == 0
        await registry.start()
        await asyncio.wait_for(follower.synced.wait(), 10)
        assert _ids(catalog, "echo") == ["echo-1"] and follower.connected

        # A change answers the blocking query at once.
        registry.set(_body(2, echo=["echo-1", "echo-2"]))

        async def two() -> bool:
            return _ids(catalog, "echo") == ["echo-1", "echo-2"]

        await eventually(two, 3, "revision 2")

        # Lost: the last catalog stays.
        await registry.stop()

        async def lost() -> bool:
            return not follower.connected

        await eventually(lost, 10, "the registry lost")
        assert catalog.snapshot.revision == 2 and _ids(catalog, "echo") == ["echo-1", "echo-2"]
        assert "lost" in caplog.text and "last known catalog (revision 2)" in caplog.text

        # Back, restarted from a lower revision: published all the same.
        registry = FakeRegistry(port)
        registry.body = _body(1, web=["web-1"])
        await registry.start()

        async def back() -> bool:
            return follower.connected and _ids(catalog, "web") == ["web-1"]

        await eventually(back, 10, "the restarted registry's catalog")
        assert _ids(catalog, "echo") == []
    finally:
        await follower.stop()
        await registry.stop()


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"services": {}},
        {"revision": 1, "services": {"echo": [{"address": "127.0.0.1"}]}},
        {"revision": 1, "services": {"echo": [{"id": "e", "address": "127.0.0.1", "health": "bad"}]}},
    ],
)
def test_parse_refuses_what_is_not_a_registry_answer(body: Any) -> None:
    with pytest.raises(ValueError):
        parse_services(body)


def test_parse_reads_the_api_answer() -> None:
    snapshot = parse_services(
        {
            "revision": 7,
            "services": {
                "web": [
                    {"id": "b", "address": "10.0.0.2", "ports": {"http": 80}, "health": "warning", "node": "n1"},
                    {"id": "a", "address": "10.0.0.1", "ports": {"http": 80}, "tags": ["x"], "meta": {"k": "v"}},
                ]
            },
        }
    )
    assert snapshot.revision == 7
    assert [i.id for i in snapshot.instances("web")] == ["a", "b"]
    assert [i.address for i in snapshot.usable("web")] == ["10.0.0.1"]
    assert snapshot.instances("web")[1].node == "n1" and snapshot.instances("web")[0].tags == ("x",)
