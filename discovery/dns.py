"""The internal DNS server: ``<service>.svc.<domain>`` from the catalog, over UDP and TCP.

Data flow::

    Catalog.publish ──► DnsAnswerCache.update (drop the changed services' answers)
                                 ▲ build on miss (DnsResolver plan → dnslib → bytes)
    UDP datagram / TCP frame ──► DnsResponder.respond ──► bytes ──► sendto / write
                                 └─ name outside the domain ──► DnsForwarder (upstreams)

This module is the I/O: binding (UDP and TCP on the same port), the per-client ``allow``
check, TCP framing and idle timeouts, the forwarding tasks, timing. What to answer is
decided in ``dns_responder`` (and below it ``dns_cache``, ``dns_zone``, ``dns_wire``).

Run alone with ``python -m discovery.dns --config FILE``: serves the ``discovery`` section of
FILE (its ``dns`` settings and static ``services``) until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import Any

from discovery.config import DiscoveryConfig, DnsConfig, format_address
from discovery.dns_cache import DnsAnswerCache
from discovery.dns_forward import DnsForwarder, resolve_upstreams
from discovery.dns_metrics import DnsStats
from discovery.dns_responder import TCP, UDP, DnsResponder, Forward
from discovery.dns_wire import RCODE_NAMES, SERVFAIL, error_reply, truncate_reply
from discovery.dns_zone import DnsResolver
from discovery.model import Catalog, Snapshot

log = logging.getLogger("pointsman.discovery.dns")

MAX_TCP_CONNECTIONS = 1024
UDP_RECEIVE_BUFFER = 4 << 20  # absorbs bursts while the loop is busy (capped by net.core.rmem_max)
_BIND_ATTEMPTS = 20  # port 0: tries to find a port free for both UDP and TCP
UDP_BATCH = 64  # datagrams read per readable event before the loop gets a turn


class DnsServer:
    """``await start()``, then ``address`` / ``tcp_address`` are where it listens."""

    def __init__(self, config: DnsConfig, catalog: Catalog, *, stats: DnsStats | None = None) -> None:
        self.config = config
        self.catalog = catalog
        self.collector = stats or DnsStats()
        self.upstreams: list[tuple[str, int]] = []
        self.resolver: DnsResolver | None = None
        self.cache: DnsAnswerCache | None = None
        self._responder: DnsResponder | None = None
        self._forwarder: DnsForwarder | None = None
        self._allow = [ipaddress.ip_network(cidr) for cidr in config.allow]
        self._allow_cache: dict[str, bool] = {}
        self._udp: _UdpServer | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._connections: set[_TcpConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self.address: tuple[str, int] = config.listen
        self.tcp_address: tuple[str, int] = config.listen

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._bind()
        self.upstreams = self._usable_upstreams(resolve_upstreams(self.config.upstreams))
        self.resolver = DnsResolver(self.config, forwarding=bool(self.upstreams))
        self.cache = DnsAnswerCache(self.resolver, ra=bool(self.upstreams))
        self._responder = DnsResponder(self.cache, self.collector)
        self._forwarder = DnsForwarder(self.upstreams, self.config.upstream_timeout, self.collector)
        cache = self.cache
        self.collector.cache_entries = lambda: len(cache.entries)
        self.collector.cache_builds = lambda: cache.builds
        self.collector.tcp_connections = lambda: len(self._connections)
        # The callback runs synchronously inside Catalog.publish: the next query already sees
        # the new snapshot (the cache drops the changed services' answers right there).
        self._unsubscribe = self.catalog.subscribe(self._on_snapshot)
        assert self._udp is not None
        self._udp.start()
        log.info(
            "dns: serving %s on udp %s and tcp %s; forwarding to %s",
            self.config.domain,
            format_address(self.address),
            format_address(self.tcp_address),
            ", ".join(map(format_address, self.upstreams)) or "nobody (other names are refused)",
        )

    async def stop(self) -> None:
        """Stop listening, close client connections, cancel forwards in flight."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
        for connection in list(self._connections):
            connection.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()
            self._tcp = None

    async def _bind(self) -> None:
        """UDP first (port 0 lets the kernel choose), then TCP on the same port; with port 0,
        when TCP finds that port taken, start over with another one."""
        loop = asyncio.get_running_loop()
        host, port = self.config.listen
        for attempt in range(_BIND_ATTEMPTS if port == 0 else 1):
            udp = _bound_socket(host, port, socket.SOCK_DGRAM)
            with contextlib.suppress(OSError):
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
            bound = udp.getsockname()[:2]
            try:
                listener = _bound_socket(host, bound[1], socket.SOCK_STREAM)
                self._tcp = await loop.create_server(lambda: _TcpConnection(self), sock=listener, backlog=1024)
            except OSError as exc:
                udp.close()
                if port == 0 and exc.errno == errno.EADDRINUSE and attempt + 1 < _BIND_ATTEMPTS:
                    continue
                raise
            self._udp = _UdpServer(self, udp)
            self.address = (bound[0], bound[1])
            tcp_bound = self._tcp.sockets[0].getsockname()
            self.tcp_address = (tcp_bound[0], tcp_bound[1])
            return

    def _usable_upstreams(self, upstreams: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Drop upstreams that are this server itself: with ``system`` and resolv.conf pointing
        here, every outside name would loop until its timeout."""
        host, port = self.address
        listen = ipaddress.ip_address(host)
        out = []
        for upstream in upstreams:
            ip = ipaddress.ip_address(upstream[0])
            ours = upstream[1] == port and (ip == listen or (listen.is_unspecified and ip.is_loopback))
            if ours:
                log.warning("dns: not forwarding to %s: that is this server", format_address(upstream))
            else:
                out.append(upstream)
        return out

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        assert self.cache is not None
        self.cache.update(snapshot)

    # -- per query ----------------------------------------------------------------------------

    def allowed(self, host: str) -> bool:
        """Whether a client address is in ``allow``; remembered per address string so that the
        hot path does a dictionary lookup, not an ipaddress parse."""
        verdict = self._allow_cache.get(host)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # a dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d
            verdict = any(ip in network for network in self._allow)
            if len(self._allow_cache) >= 65536:
                self._allow_cache.clear()
            self._allow_cache[host] = verdict
        return verdict

    def forward(self, request: Forward, send: Callable[[bytes], None], started: float) -> None:
        task = asyncio.get_running_loop().create_task(self._forward(request, send, started))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, request: Forward, send: Callable[[bytes], None], started: float) -> None:
        assert self._forwarder is not None
        try:
            reply = await self._forwarder.resolve(request.query)
        except Exception:
            # A bug here must cost one query (answered SERVFAIL), not the task's silence.
            log.exception("dns: forwarding failed")
            reply = None
        if reply is None:
            reply = error_reply(request.query, request.question, SERVFAIL, request.mode, True)
        elif len(reply) > request.limit:
            reply = truncate_reply(reply, 12 + len(request.question))
        rcode = RCODE_NAMES.get(reply[3] & 0x0F, str(reply[3] & 0x0F))
        self.collector.queries.values[("", request.qtype, rcode, "tcp" if request.transport else "udp")] += 1
        send(reply)
        self.collector.duration.observe((), perf_counter() - started)


def _bound_socket(host: str, port: int, kind: socket.SocketKind) -> socket.socket:
    """A non-blocking socket bound to (host, port). Made by hand rather than by asyncio: for
    UDP see :class:`_UdpServer`; for TCP, asyncio sets IPV6_V6ONLY on the sockets it makes,
    and ``[::]:53`` should take IPv4 clients over TCP as it does over UDP."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _UdpServer:
    """The UDP side: the event loop says the socket is readable, we read up to
    :data:`UDP_BATCH` datagrams and answer each at once with ``sendto``.

    Not an asyncio DatagramProtocol: measured at saturation, uvloop's UDP transport cost ~10 us
    of CPU per query and this loop ~8 us (the same responder behind both). The transport's
    extras buy nothing here: an answer that does not fit the socket's send buffer is dropped
    (and counted), as any DNS server drops under overload, instead of being queued in user
    space. The batch bound keeps TCP clients and forwarded answers from waiting behind a
    flood."""

    def __init__(self, server: DnsServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._duration = server.collector.duration
        self._duration_row = server.collector.duration_row

    def start(self) -> None:
        """Called once the server can answer (the reader is level-triggered: registering it
        earlier would spin on datagrams nobody can answer yet)."""
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        # The hot path: locals only.
        server = self.server
        responder = server._responder
        assert responder is not None
        recvfrom = self.sock.recvfrom
        sendto = self.sock.sendto
        allow = server._allow_cache
        buckets = self._duration.buckets
        row = self._duration_row
        for _ in range(UDP_BATCH):
            try:
                data, addr = recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued for an earlier answer
                log.debug("dns: udp receive: %s", exc)
                continue
            started = perf_counter()
            allowed = allow.get(addr[0])
            if allowed is None:
                allowed = server.allowed(addr[0])
            reply = responder.respond(data, allowed, UDP)
            if reply.__class__ is bytes:
                try:
                    sendto(reply, addr)
                except OSError as exc:
                    self._send_failed(exc, addr)
                elapsed = perf_counter() - started
                row[bisect.bisect_left(buckets, elapsed)] += 1
                row[-1] += elapsed
            elif isinstance(reply, Forward):
                server.forward(reply, partial(self._send, sendto, addr=addr), started)

    def _send(self, sendto: Callable[[bytes, Any], int], reply: bytes, addr: Any) -> None:
        try:
            sendto(reply, addr)
        except OSError as exc:
            self._send_failed(exc, addr)

    def _send_failed(self, exc: OSError, addr: Any) -> None:
        if isinstance(exc, BlockingIOError | InterruptedError):
            self.server.collector.dropped.values[("udp_send_buffer",)] += 1
        else:  # the client's address became unreachable, the socket closed
            log.debug("dns: udp send to %s: %s", addr, exc)

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class _TcpConnection(asyncio.Protocol):
    """One client connection: 2-byte length-prefixed messages (RFC 1035 4.2.2), several per
    connection, answered as they complete (forwarded ones may overtake, as RFC 7766 6.2.1.1
    allows). Closed after ``tcp_idle_timeout`` without a query or pending answer."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.allowed = False
        self.buffer = bytearray()
        self.pending = 0  # forwarded queries not yet answered
        self.last_active = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if len(server._connections) >= MAX_TCP_CONNECTIONS:
            server.collector.dropped.values[("tcp_limit",)] += 1
            transport.close()
            return
        server._connections.add(self)
        peer = transport.get_extra_info("peername")
        self.allowed = bool(peer) and server.allowed(peer[0])
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        self._timer = loop.call_later(server.config.tcp_idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        self.last_active = asyncio.get_running_loop().time()
        buffer = self.buffer
        while len(buffer) >= 2:
            size = (buffer[0] << 8) | buffer[1]
            if size < 12:
                # Not even a header: there is nothing to answer and the stream cannot be trusted
                # to be in step any more.
                self.server.collector.dropped.values[("tcp_framing",)] += 1
                self.close()
                return
            if len(buffer) < 2 + size:
                return
            message = bytes(buffer[2 : 2 + size])
            del buffer[: 2 + size]
            self._handle(message)
            if self.transport.is_closing():
                return

    def _handle(self, message: bytes) -> None:
        started = perf_counter()
        server = self.server
        assert server._responder is not None
        reply = server._responder.respond(message, self.allowed, TCP)
        if reply is None:
            return
        if isinstance(reply, Forward):
            self.pending += 1
            server.forward(reply, self._send_forwarded, started)
            return
        self._send(reply)
        server.collector.duration.observe((), perf_counter() - started)

    def _send(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(len(reply).to_bytes(2, "big") + reply)

    def _send_forwarded(self, reply: bytes) -> None:
        self.pending -= 1
        self.last_active = asyncio.get_running_loop().time()
        self._send(reply)

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        idle = loop.time() - self.last_active
        timeout = self.server.config.tcp_idle_timeout
        if idle >= timeout and not self.pending:
            self.close()
        else:
            self._timer = loop.call_later(max(timeout - idle, 0.05), self._check_idle)

    # A client that does not read its answers: stop reading its queries until it does.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.server._connections.discard(self)


# -- python -m discovery.dns ----------------------------------------------------------------------


def load_config(path: str) -> DiscoveryConfig:
    """The ``discovery`` section of a config file; SystemExit with every problem by path."""
    import yaml
    from pydantic import ValidationError

    from discovery.config import describe_errors

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"{path}: cannot read the config: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("discovery"), dict):
        raise SystemExit(f"{path}: no 'discovery' section (a mapping with 'dns' and 'services')")
    try:
        config = DiscoveryConfig.model_validate(data["discovery"])
    except ValidationError as exc:
        lines = [f"  {path}: {problem}" for problem in describe_errors(exc, prefix="discovery")]
        raise SystemExit(f"{path}: invalid config\n" + "\n".join(lines)) from None
    if config.dns is None:
        raise SystemExit(f"{path}: discovery.dns: required key is missing (where to listen)")
    return config


async def serve(config: DiscoveryConfig) -> None:
    assert config.dns is not None
    catalog = Catalog()
    catalog.publish(config.static_snapshot())
    server = DnsServer(config.dns, catalog)
    await server.start()
    print(
        f"dns: listening on udp {format_address(server.address)} tcp {format_address(server.tcp_address)}",
        flush=True,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await stopping.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m discovery.dns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a YAML file with a 'discovery' section")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a runtime dependency on Linux
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
