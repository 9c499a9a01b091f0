"""Forwarding names outside the zone to upstream resolvers (UDP, then TCP when truncated).

Not a cache and not a recursive resolver: one query in, the same query out to the first
upstream that answers, its answer back. Each try uses a fresh UDP socket (a kernel-chosen
source port) and a random ID, and an answer is accepted only when ID, QR and question match,
so an off-path attacker has to guess both to slip in a forged answer (RFC 5452).

Upstreams are tried in order; one that times out, cannot be reached (ICMP port unreachable
arrives as ECONNREFUSED on the connected socket) or answers SERVFAIL/REFUSED makes way for
the next. When all fail the caller answers SERVFAIL. ``max_inflight`` bounds the queries
waiting upstream: past it a query fails at once instead of queueing behind a dead upstream.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from pathlib import Path

from discovery.config import format_address
from discovery.dns_metrics import DnsStats
from discovery.dns_wire import AA, QR, RA, REFUSED, SERVFAIL, TC, question_end

log = logging.getLogger("pointsman.discovery.dns")

RESOLV_CONF = Path("/etc/resolv.conf")


def system_nameservers(path: Path | None = None) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of resolv.conf (port 53), in order; [] when it is unreadable."""
    path = RESOLV_CONF if path is None else path
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                out.append((str(ipaddress.ip_address(fields[1])), 53))
            except ValueError:
                log.warning("%s: ignoring nameserver %r: not an IP address", path, fields[1])
    return out


def resolve_upstreams(items: list[str], path: Path | None = None) -> list[tuple[str, int]]:
    """Config upstreams (``system`` or ``ip:port``, validated by DnsConfig) as addresses."""
    out: list[tuple[str, int]] = []
    for item in items:
        if item == "system":
            out += system_nameservers(path)
            continue
        host, _, port = item.rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return list(dict.fromkeys(out))  # in order, each once


class _UdpExchange(asyncio.DatagramProtocol):
    """One query's UDP socket: resolves ``done`` with the first matching answer."""

    def __init__(self, query_id: bytes, question: bytes) -> None:
        self.query_id = query_id
        self.question = question.lower()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        # Anything else (late answers to an earlier try, forgeries) is ignored, not an error.
        if (
            not self.done.done()
            and len(data) >= 12
            and data[:2] == self.query_id
            and data[2] & QR
            and data[12 : 12 + len(self.question)].lower() == self.question
        ):
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed"))


class DnsForwarder:
    def __init__(
        self, upstreams: list[tuple[str, int]], timeout: float, stats: DnsStats, max_inflight: int = 1024
    ) -> None:
        self.upstreams = upstreams
        self.timeout = timeout
        self.stats = stats
        self.max_inflight = max_inflight
        self.inflight = 0

    async def resolve(self, query: bytes) -> bytes | None:
        """The upstream answer to ``query`` (with the client's ID), or None when every upstream
        failed. ``query`` must have a readable question (the responder checked it)."""
        end = question_end(query)
        if end is None or not self.upstreams:
            self.stats.forwarded.values[("error",)] += 1
            return None
        if self.inflight >= self.max_inflight:
            self.stats.forwarded.values[("overload",)] += 1
            return None
        self.inflight += 1
        try:
            result, answer = await self._try_all(query, query[12:end])
        finally:
            self.inflight -= 1
        self.stats.forwarded.values[(result,)] += 1
        if answer is None:
            return None
        # Our answer to the client is a recursive one: recursion available, and not
        # authoritative whatever the upstream was (RFC 1035 4.1.1).
        return query[:2] + bytes((answer[2] & ~AA & 0xFF, answer[3] | RA)) + answer[4:]

    async def _try_all(self, query: bytes, question: bytes) -> tuple[str, bytes | None]:
        result = "error"
        fallback: bytes | None = None
        for upstream in self.upstreams:
            query_id = secrets.token_bytes(2)
            message = query_id + query[2:]
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await self._udp(upstream, message, query_id, question)
                    if answer[2] & TC:
                        self.stats.forwarded.values[("tcp_retry",)] += 1
                        answer = await self._tcp(upstream, message, query_id, question)
            except TimeoutError:
                result = "timeout"
                log.debug("upstream %s timed out", format_address(upstream))
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                result = "error"
                log.debug("upstream %s failed: %s", format_address(upstream), exc)
                continue
            if answer[3] & 0x0F in (SERVFAIL, REFUSED):
                # This upstream could not help; another might. Keep its answer in case none can.
                fallback = answer
                result = "ok"
                continue
            return "ok", answer
        return result, fallback

    async def _udp(self, upstream: tuple[str, int], message: bytes, query_id: bytes, question: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        transport, exchange = await loop.create_datagram_endpoint(
            lambda: _UdpExchange(query_id, question), remote_addr=upstream
        )
        try:
            transport.sendto(message)
            return await exchange.done
        finally:
            transport.close()

    async def _tcp(self, upstream: tuple[str, int], message: bytes, query_id: bytes, question: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*upstream)
        try:
            writer.write(len(message).to_bytes(2, "big") + message)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            answer = await reader.readexactly(size)
        finally:
            writer.close()
        if len(answer) < 12 or answer[:2] != query_id or not answer[2] & QR:
            raise ValueError("the TCP answer does not match the query")
        if answer[12 : 12 + len(question)].lower() != question.lower():
            raise ValueError("the TCP answer is for another question")
        return answer
