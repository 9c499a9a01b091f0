"""Shared helpers of the HTTP proxy tests (this module holds no tests itself).

Raw-socket clients and upstreams for the cases where exact bytes matter: aiohttp (client and
server) normalises framing, so tests of framing, pipelining and malformed input talk HTTP by
hand here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from router.listeners import Router
from tests.support import Handler, http_upstream, running_router, wait_until
from tests.support import stream_server as raw_upstream

__all__ = ["ARRIVED", "PEERS", "Handler", "echo_app", "headers_of", "proxied", "raw_upstream", "until"]


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    await wait_until(predicate, timeout, what=repr(predicate))


def http_config(
    clusters: dict[str, dict[str, Any]],
    routes: list[dict[str, Any]],
    *,
    http: dict[str, Any] | None = None,
    name: str = "web",
) -> dict[str, Any]:
    listener: dict[str, Any] = {"name": name, "listen": "127.0.0.1:0", "routes": routes}
    if http:
        listener["http"] = http
    return {"clusters": clusters, "listeners": [listener]}


def one_cluster(address: tuple[str, int], **cluster: Any) -> dict[str, Any]:
    """A config with one cluster ``up`` at ``address`` and one catch-all route to it."""
    route = cluster.pop("route", {})
    http = cluster.pop("http", None)
    return http_config(
        {"up": {"endpoints": [f"{address[0]}:{address[1]}"], **cluster}},
        [{"name": "all", "match": {"path_prefix": "/"}, "to": "up", **route}],
        http=http,
    )


class Response:
    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, raw_head: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.raw_head = raw_head

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers} {self.body[:80]!r}>"


async def read_head(reader: asyncio.StreamReader) -> tuple[int, str, list[tuple[str, str]], bytes]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    _version, status, *rest = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return int(status), (rest[0] if rest else ""), headers, raw


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False) -> Response:
    """One response, framed by Content-Length, chunked encoding or the connection's end.
    Interim (1xx) responses other than 101 are skipped."""
    while True:
        status, reason, headers, raw = await read_head(reader)
        if status >= 200 or status == 101:
            break
    response = Response(status, reason, headers, b"", raw)
    if head_request or status in (101, 204, 304):
        return response
    te = response.header("transfer-encoding")
    length = response.header("content-length")
    if te is not None and te.lower().endswith("chunked"):
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                break
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        response.body = bytes(body)
    elif length is not None:
        response.body = await reader.readexactly(int(length))
    else:
        response.body = await reader.read()
    return response


@asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def exchange(port: int, data: bytes, *, head_request: bool = False) -> Response:
    """Send ``data`` on a new connection and read one response."""
    async with raw_client(port) as (reader, writer):
        writer.write(data)
        return await asyncio.wait_for(read_response(reader, head_request=head_request), 10)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything until the peer closes (a reset also counts as closed)."""
    chunks = []
    try:
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    except ConnectionError:
        pass
    return b"".join(chunks)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]], bytes]:
    """One request as an upstream sees it: the request line, headers, and the body (framed
    by Content-Length or chunked)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    found = {k.lower(): v for k, v in headers}
    body = b""
    if found.get("transfer-encoding", "").lower() == "chunked":
        parts = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            parts += await reader.readexactly(size)
            await reader.readexactly(2)
        body = bytes(parts)
    elif "content-length" in found:
        body = await reader.readexactly(int(found["content-length"]))
    return lines[0], headers, body


def rss_bytes() -> int:
    """This process's resident set size now (not the peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# -- an aiohttp upstream that describes what it received (moved from test_http_proxy) --

PEERS = web.AppKey("peers", set[Any])


ARRIVED = web.AppKey("arrived", asyncio.Event)  # set when a /delay/ request reaches the app


def echo_app(name: str = "up") -> web.Application:
    """Answers with JSON describing the request it got, and a few special paths."""
    app = web.Application()
    app[PEERS] = set()
    app[ARRIVED] = asyncio.Event()

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        app[PEERS].add(peer)
        if request.path.startswith("/delay/"):
            app[ARRIVED].set()
            await asyncio.sleep(int(request.path.rsplit("/", 1)[1]) / 1000)
        if request.path == "/status/204":
            return web.Response(status=204)
        if request.path == "/status/304":
            return web.Response(status=304, headers={"ETag": '"x"'})
        if request.path == "/chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (b"alpha-", b"beta-", b"gamma"):
                await response.write(part)
            await response.write_eof()
            return response
        info = {
            "name": name,
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_len": len(body),
        }
        return web.json_response(info)

    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@asynccontextmanager
async def proxied(app: web.Application, **cluster: Any) -> AsyncIterator[tuple[Router, str]]:
    """An upstream running ``app`` and a router in front of it; yields (router, base url)."""
    async with http_upstream(app) as address, running_router(one_cluster(address, **cluster)) as router:
        host, port = router.address_of("web")
        yield router, f"http://{host}:{port}"


def headers_of(info: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in info["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out
