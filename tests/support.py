"""Real servers for tests: every one binds 127.0.0.1:0 and hands back the port it got."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, cast

import pytest
from aiohttp import web

from pointsman.config import parse_config
from router.listeners import Router


@asynccontextmanager
async def running_router(config: dict[str, Any]) -> AsyncIterator[Router]:
    """A Router applied from a config dict (validated exactly as a file would be)."""
    parsed = parse_config(config, "<test>")
    router = Router()
    await router.apply(parsed.clusters, parsed.listeners, parsed.policies)
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


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll every 10 ms until ``predicate()`` holds; fail after ``timeout`` seconds. For state
    that offers no event to await (a counter back at zero after a connection_lost, say)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def stream_server(handler: Handler) -> AsyncIterator[tuple[str, int]]:
    """A server on an ephemeral port running ``handler`` per connection; on exit every handler
    task is cancelled and every socket closed (no 'unclosed transport' leaks into later tests)."""
    tasks: set[asyncio.Task[None]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)  # type: ignore[arg-type]
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Cancelled by the teardown below. Ending normally keeps asyncio's stream server
            # from logging the cancellation as an error (it calls task.exception()).
            return
        finally:
            writer.close()
            tasks.discard(task)  # type: ignore[arg-type]

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield host, port
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers:
            writer.close()
        await server.wait_closed()


class _Echo(asyncio.Protocol):
    """Echoes; on the client's FIN it flushes and closes."""

    def __init__(self, transports: set[asyncio.Transport]) -> None:
        self.transports = transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transports.add(self.transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once the echoes are flushed

    def connection_lost(self, exc: Exception | None) -> None:
        self.transports.discard(self.transport)


@asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[str, int]]:
    transports: set[asyncio.Transport] = set()
    server = await asyncio.get_running_loop().create_server(lambda: _Echo(transports), "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield host, port
    finally:
        server.close()
        for transport in list(transports):
            transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost run


def missing(message: str) -> NoReturn:
    """Something a test needs is not installed: skipped on a developer's machine, a failure
    under CI (`make test` installs it as root), where a missing package must not turn into a
    quietly green run."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {message}", pytrace=False)
    pytest.skip(message)
