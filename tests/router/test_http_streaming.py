"""Large bodies stream through the proxy with back-pressure: memory stays bounded while a
GiB goes through, even when the receiving side stops reading for a while."""

from __future__ import annotations

import asyncio
import os

from tests.router.test_http_helpers import one_cluster, raw_client, raw_upstream, read_head, rss_bytes
from tests.support import running_router

TOTAL = 1024 * 1024 * 1024  # 1 GiB each way
BLOCK = os.urandom(1024 * 1024)
PATTERN = BLOCK * 2  # any window of up to len(BLOCK) bytes at offset % len(BLOCK) is a slice
STALL = 1.0  # the receiver reads nothing for this long at the start
RSS_LIMIT = 96 * 1024 * 1024  # growth allowed while a GiB passes


class Checker:
    """Verifies a stream against the repeating BLOCK without keeping it, and samples RSS."""

    def __init__(self, baseline: int) -> None:
        self.offset = 0
        self.baseline = baseline
        self.peak = 0
        self.next_sample = 0

    def feed(self, data: bytes) -> None:
        start = self.offset % len(BLOCK)
        view = memoryview(data)
        while view:
            piece = view[: len(BLOCK)]
            assert piece == PATTERN[start : start + len(piece)], f"corrupt at offset {self.offset}"
            self.offset += len(piece)
            start = self.offset % len(BLOCK)
            view = view[len(piece) :]
        if self.offset >= self.next_sample:
            self.sample()
            self.next_sample = self.offset + 32 * 1024 * 1024

    def sample(self) -> None:
        self.peak = max(self.peak, rss_bytes() - self.baseline)


async def send_pattern(writer: asyncio.StreamWriter, total: int) -> None:
    sent = 0
    step = 256 * 1024
    while sent < total:
        start = sent % len(BLOCK)
        piece = BLOCK[start : start + min(step, total - sent)]
        writer.write(piece)
        sent += len(piece)
        await writer.drain()


async def test_1gib_download_with_a_stalled_client_keeps_memory_bounded() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TOTAL)
        await send_pattern(writer, TOTAL)
        await reader.read()

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        checker = Checker(rss_bytes())
        async with raw_client(router.address_of("web")[1]) as (reader, writer):
            writer.write(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
            status, _, headers, _ = await asyncio.wait_for(read_head(reader), 5)
            assert status == 200 and ("Content-Length", str(TOTAL)) in headers
            # Read nothing for a while: without back-pressure the proxy would buffer what the
            # upstream sends meanwhile (hundreds of MB on loopback).
            await asyncio.sleep(STALL)
            checker.sample()
            while checker.offset < TOTAL:
                data = await asyncio.wait_for(reader.read(1024 * 1024), 10)
                assert data, f"connection ended after {checker.offset} bytes"
                checker.feed(data)
            checker.sample()
        assert checker.offset == TOTAL
        assert checker.peak < RSS_LIMIT, f"RSS grew by {checker.peak / 2**20:.0f} MiB"
        assert router.clusters["up"].endpoints[0].active == 0


async def test_1gib_upload_with_a_stalled_upstream_keeps_memory_bounded() -> None:
    checker = Checker(rss_bytes())

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Content-Length: %d" % TOTAL in head
        await asyncio.sleep(STALL)  # not reading: the client must be held back
        checker.sample()
        while checker.offset < TOTAL:
            data = await reader.read(1024 * 1024)
            assert data
            checker.feed(data)
        body = b"%d" % checker.offset
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        await reader.read()

    async with raw_upstream(handler) as address, running_router(one_cluster(address)) as router:
        async with raw_client(router.address_of("web")[1]) as (reader, writer):
            writer.write(b"PUT /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % TOTAL)
            await send_pattern(writer, TOTAL)
            status, _, headers, _ = await asyncio.wait_for(read_head(reader), 10)
            assert status == 200
            length = int(dict(headers)["Content-Length"])
            assert await reader.readexactly(length) == b"%d" % TOTAL
        checker.sample()
        assert checker.offset == TOTAL
        assert checker.peak < RSS_LIMIT, f"RSS grew by {checker.peak / 2**20:.0f} MiB"
        assert router.clusters["up"].endpoints[0].active == 0
