"""The TCP proxy end to end: real clients, a real router, real upstream servers on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

from router.listeners import Router
from router.tcp_proxy import TcpProxyProtocol
from tests.support import echo_server, running_router, stream_server, wait_until

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextmanager
def closed_port() -> Iterator[tuple[str, int]]:
    """An address that refuses connections: a bound socket that never listens (kept bound,
    so nothing else can take the port while the test runs)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        host, port = sock.getsockname()[:2]
        yield host, port
    finally:
        sock.close()


def addr(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def tcp_config(*endpoints: tuple[str, int], **cluster: Any) -> dict[str, Any]:
    return {
        "clusters": {"c": {"endpoints": [addr(e) for e in endpoints], **cluster}},
        "listeners": [{"name": "tcp", "listen": "127.0.0.1:0", "protocol": "tcp", "to": "c"}],
    }


@asynccontextmanager
async def client(router: Router) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = router.address_of("tcp")
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


async def echo_roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(3):
        return await reader.readexactly(len(data))


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """Everything until the peer's EOF; a reset counts as the end too."""
    async with asyncio.timeout(timeout):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


def sessions(router: Router) -> list[TcpProxyProtocol]:
    return [c for c in router.listeners["tcp"].connections if isinstance(c, TcpProxyProtocol)]


def name_server(name: bytes) -> Handler:
    """Says its name, then waits for the client to finish."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name)
        await writer.drain()
        await reader.read()

    return handle


# -- forwarding ----------------------------------------------------------------------------


async def test_echo_and_session_bookkeeping() -> None:
    async with echo_server() as echo, running_router(tcp_config(echo)) as router:
        cluster = router.clusters["c"]
        endpoint = cluster.endpoints[0]
        stats = router.stats
        async with client(router) as (reader, writer):
            for i in range(5):
                payload = f"ping {i}".encode() * (i + 1)
                assert await echo_roundtrip(reader, writer, payload) == payload
            assert cluster.connections == 1
            assert endpoint.connections == 1 and endpoint.active == 1
            assert stats.downstream_active["tcp"] == 1
        await wait_until(lambda: cluster.connections == 0, what="session end")
        sent = sum(len(f"ping {i}".encode() * (i + 1)) for i in range(5))
        assert endpoint.connections == 0 and endpoint.active == 0
        assert stats.downstream_active["tcp"] == 0
        assert not router.listeners["tcp"].connections
        assert stats.downstream_connections.get(("tcp",)) == 1
        assert stats.tcp_connections.get(("tcp", "c")) == 1
        assert stats.upstream_connections.get(("c",)) == 1
        assert stats.tcp_bytes.get(("tcp", "upstream")) == sent
        assert stats.tcp_bytes.get(("tcp", "downstream")) == sent
        assert stats.upstream_connect_failures.get(("c",)) == 0


async def test_large_transfer_is_intact() -> None:
    size = 64 * 1024 * 1024
    chunk = os.urandom(1024 * 1024)
    async with echo_server() as echo, running_router(tcp_config(echo)) as router:
        async with client(router) as (reader, writer):
            sent_hash = hashlib.sha256()
            got_hash = hashlib.sha256()
            buffered: list[int] = []

            async def send() -> None:
                for i in range(size // len(chunk)):
                    # Vary each chunk so a reordered or repeated chunk changes the hash.
                    piece = i.to_bytes(8, "big") + chunk[8:]
                    sent_hash.update(piece)
                    writer.write(piece)
                    await writer.drain()
                    if i % 8 == 0:
                        for s in sessions(router):
                            if s.transport is not None and s._up_transport is not None:
                                buffered.append(s.transport.get_write_buffer_size())
                                buffered.append(s._up_transport.get_write_buffer_size())
                writer.write_eof()

            async def receive() -> int:
                total = 0
                while data := await reader.read(1 << 20):
                    got_hash.update(data)
                    total += len(data)
                return total

            async with asyncio.timeout(30):
                _, received = await asyncio.gather(send(), receive())
        assert received == size
        assert got_hash.digest() == sent_hash.digest()
        # Back-pressure keeps the proxy's own buffers near the transports' high-water mark.
        assert buffered and max(buffered) < 1024 * 1024
        await wait_until(lambda: router.stats.tcp_bytes.get(("tcp", "downstream")) == size, what="byte counters")
        assert router.stats.tcp_bytes.get(("tcp", "upstream")) == size


async def test_slow_upstream_stalls_the_client_not_the_proxys_memory() -> None:
    """An upstream that does not read: the proxy stops reading the client instead of
    buffering what the client keeps sending."""
    size = 64 * 1024 * 1024
    release = asyncio.Event()
    received = hashlib.sha256()
    received_bytes = 0

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received_bytes
        await release.wait()
        while data := await reader.read(1 << 20):
            received.update(data)
            received_bytes += len(data)
        writer.write(b"done")
        await writer.drain()

    async with stream_server(sink) as upstream, running_router(tcp_config(upstream)) as router:
        async with client(router) as (reader, writer):
            chunk = os.urandom(256 * 1024)
            sent = hashlib.sha256()
            written = 0
            stalled = False
            while written < size:
                writer.write(chunk)
                sent.update(chunk)
                written += len(chunk)
                try:
                    async with asyncio.timeout(0.3):
                        await writer.drain()
                except TimeoutError:
                    stalled = True
                    break
            assert stalled, "the client could write everything though the upstream never read"
            # What is in flight sits in kernel socket buffers, not in the proxy.
            assert written < size
            [session] = sessions(router)
            assert session._up_transport is not None
            assert session._up_transport.get_write_buffer_size() < 1024 * 1024
            release.set()
            async with asyncio.timeout(20):
                await writer.drain()
                while written < size:
                    writer.write(chunk)
                    sent.update(chunk)
                    written += len(chunk)
                    await writer.drain()
                writer.write_eof()
                assert await read_to_eof(reader, timeout=20) == b"done"
        assert received_bytes == size
        assert received.digest() == sent.digest()


# -- half-close ----------------------------------------------------------------------------


async def test_client_half_close_still_gets_the_answer() -> None:
    async def digest_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's FIN
        writer.write(hashlib.sha256(data).hexdigest().encode())
        await writer.drain()

    payload = os.urandom(3 * 1024 * 1024 + 17)
    async with stream_server(digest_after_eof) as upstream, running_router(tcp_config(upstream)) as router:
        async with client(router) as (reader, writer):
            writer.write(payload)
            writer.write_eof()
            answer = await read_to_eof(reader)
        assert answer == hashlib.sha256(payload).hexdigest().encode()
        await wait_until(lambda: router.clusters["c"].connections == 0, what="session end")


async def test_upstream_half_close_keeps_the_client_direction_open() -> None:
    got = asyncio.get_running_loop().create_future()

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello, then FIN")
        await writer.drain()
        writer.write_eof()
        got.set_result(await reader.read())

    async with stream_server(greet_then_listen) as upstream, running_router(tcp_config(upstream)) as router:
        async with client(router) as (reader, writer):
            assert await read_to_eof(reader) == b"hello, then FIN"
            # The upstream only closed its sending side: what the client sends now must arrive.
            await asyncio.sleep(0.05)
            writer.write(b"still talking")
            await writer.drain()
            writer.write(b", done")
            writer.write_eof()
            async with asyncio.timeout(3):
                assert await got == b"still talking, done"
        await wait_until(lambda: router.clusters["c"].connections == 0, what="session end")
        await wait_until(lambda: not router.listeners["tcp"].connections, what="listener idle")


# -- balancing and failover ------------------------------------------------------------------


async def _names_seen(router: Router, count: int) -> Counter[bytes]:
    seen: Counter[bytes] = Counter()
    for _ in range(count):
        async with client(router) as (reader, _writer):
            async with asyncio.timeout(3):
                seen[await reader.readexactly(1)] += 1
    return seen


async def test_round_robin_spreads_sessions_evenly() -> None:
    async with (
        stream_server(name_server(b"a")) as a,
        stream_server(name_server(b"b")) as b,
        stream_server(name_server(b"c")) as c,
        running_router(tcp_config(a, b, c, balancer="round_robin")) as router,
    ):
        assert await _names_seen(router, 12) == {b"a": 4, b"b": 4, b"c": 4}


async def test_hash_keeps_a_client_on_one_endpoint() -> None:
    async with (
        stream_server(name_server(b"a")) as a,
        stream_server(name_server(b"b")) as b,
        stream_server(name_server(b"c")) as c,
        running_router(tcp_config(a, b, c, balancer="hash")) as router,
    ):
        seen = await _names_seen(router, 10)
        # Every connection comes from 127.0.0.1: one client address, one endpoint.
        assert len(seen) == 1 and sum(seen.values()) == 10


async def test_connect_failure_falls_over_to_another_endpoint() -> None:
    with closed_port() as dead:
        async with echo_server() as echo, running_router(tcp_config(dead, echo)) as router:
            for i in range(4):
                async with client(router) as (reader, writer):
                    assert await echo_roundtrip(reader, writer, b"x%d" % i) == b"x%d" % i
            cluster = router.clusters["c"]
            # Round robin sends every other session to the dead endpoint first.
            assert router.stats.upstream_connect_failures.get(("c",)) == 2
            assert cluster.endpoints[0].consecutive_failures == 2
            assert cluster.endpoints[0].active == 0
            assert router.stats.tcp_connections.get(("tcp", "c")) == 4


async def test_hash_failover_skips_every_endpoint_it_tried() -> None:
    """With a hash balancer the ring keeps pointing at the same dead endpoints; failover must
    walk past all of them to the live one, whichever the client address hashes to."""
    with closed_port() as d1, closed_port() as d2, closed_port() as d3:
        async with echo_server() as echo, running_router(tcp_config(d1, d2, d3, echo, balancer="hash")) as router:
            for _ in range(3):
                async with client(router) as (reader, writer):
                    assert await echo_roundtrip(reader, writer, b"through") == b"through"
            assert router.stats.tcp_connections.get(("tcp", "c")) == 3


async def test_all_endpoints_down_closes_the_client() -> None:
    with closed_port() as d1, closed_port() as d2:
        async with running_router(tcp_config(d1, d2)) as router:
            async with client(router) as (reader, writer):
                writer.write(b"anyone?")
                assert await read_to_eof(reader) == b""
            cluster = router.clusters["c"]
            await wait_until(lambda: cluster.connections == 0, what="slot released")
            assert router.stats.upstream_connect_failures.get(("c",)) == 2  # each tried once
            assert router.stats.tcp_connections.get(("tcp", "c")) == 0
            assert all(e.active == 0 and e.connections == 0 for e in cluster.endpoints)


async def test_connect_timeout_counts_as_a_failure() -> None:
    # A listening socket with a full accept queue: Linux drops further SYNs, so a connect to
    # it neither succeeds nor fails until the timeout.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    stuck = listener.getsockname()[:2]
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.settimeout(0.2)
            try:
                filler.connect(stuck)
            except TimeoutError:
                break
        async with echo_server() as echo:
            config = tcp_config(stuck, echo, balancer="round_robin", connect_timeout="200ms")
            async with running_router(config) as router:
                started = time.monotonic()
                async with client(router) as (reader, writer):
                    assert await echo_roundtrip(reader, writer, b"late") == b"late"
                assert time.monotonic() - started >= 0.19
                assert router.stats.upstream_connect_failures.get(("c",)) == 1
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# -- limits ----------------------------------------------------------------------------------


async def test_max_connections_refuses_the_overflow() -> None:
    async with echo_server() as echo, running_router(tcp_config(echo, limits={"max_connections": 2})) as router:
        cluster = router.clusters["c"]
        async with client(router) as (r1, w1), client(router) as (r2, w2):
            assert await echo_roundtrip(r1, w1, b"one") == b"one"
            assert await echo_roundtrip(r2, w2, b"two") == b"two"
            async with client(router) as (r3, w3):
                w3.write(b"three")
                assert await read_to_eof(r3) == b""
            assert router.stats.upstream_overflows.get(("c", "max_connections")) == 1
            assert cluster.overflows == 1
            # The refused client held no slot, and the admitted ones still work.
            assert cluster.connections == 2
            assert await echo_roundtrip(r1, w1, b"still") == b"still"
        await wait_until(lambda: cluster.connections == 0, what="slots released")
        async with client(router) as (r4, w4):
            assert await echo_roundtrip(r4, w4, b"four") == b"four"


# -- draining ----------------------------------------------------------------------------------


async def test_drain_lets_a_session_finish_before_the_deadline() -> None:
    async with echo_server() as echo, running_router(tcp_config(echo)) as router:
        address = router.address_of("tcp")
        async with client(router) as (reader, writer):
            assert await echo_roundtrip(reader, writer, b"before") == b"before"
            started = time.monotonic()
            drain = asyncio.create_task(router.drain(10.0))
            await asyncio.sleep(0.05)
            # New clients are refused, but the open session keeps working.
            try:
                _, extra = await asyncio.open_connection(*address)
            except ConnectionRefusedError:
                pass
            else:
                extra.close()
                raise AssertionError("a draining listener accepted a new connection")
            assert await echo_roundtrip(reader, writer, b"during") == b"during"
            assert not drain.done()
        # The client finished: the drain ends then, long before its deadline.
        async with asyncio.timeout(3):
            await drain
        assert time.monotonic() - started < 3


async def test_drain_deadline_aborts_both_sides() -> None:
    upstream_closed = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            upstream_closed.set()

    async with stream_server(hold) as upstream, running_router(tcp_config(upstream)) as router:
        async with client(router) as (reader, writer):
            writer.write(b"idle session")
            await wait_until(lambda: router.clusters["c"].endpoints[0].connections == 1, what="upstream connected")
            started = time.monotonic()
            await router.drain(0.2)
            elapsed = time.monotonic() - started
            assert 0.18 <= elapsed < 2, elapsed  # waited for the deadline, then cut
            assert await read_to_eof(reader, timeout=2) == b""
            async with asyncio.timeout(2):
                await upstream_closed.wait()
        await wait_until(lambda: router.clusters["c"].connections == 0, what="slot released")
        assert not router.listeners["tcp"].connections
