"""Real servers for tests: every one binds 127.0.0.1:0 and hands back the port it got."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from pointsman.config import parse_config
from router.listeners import Router


@asynccontextmanager
async def running_router(config: dict[str, Any]) -> AsyncIterator[Router]:
    """A Router applied from a config dict (validated exactly as a file would be)."""
    parsed = parse_config(config, "<test>")
    router = Router()
    await router.apply(parsed.clusters, parsed.listeners)
    try:
        yield router
    finally:
        await router.close()


@asynccontextmanager
async def http_upstream(app: web.Application) -> AsyncIterator[tuple[str, int]]:
    """An aiohttp server for ``app`` on an ephemeral port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        # uvloop's Server is not an asyncio.Server subclass, hence getattr over isinstance.
        sockets = getattr(site._server, "sockets", None)
        assert sockets, "the upstream did not bind"
        host, port = sockets[0].getsockname()[:2]
        yield host, port
    finally:
        await runner.cleanup()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        # The client finished sending: everything was echoed already; close our side too.
        return False


@asynccontextmanager
async def tcp_echo_server() -> AsyncIterator[tuple[str, int]]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield host, port
    finally:
        server.close()
        await server.wait_closed()
