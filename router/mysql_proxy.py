"""MySQL / MariaDB listener: a TCP session with the l7 session filter in both directions.

Data flow::

    client ──► MySqlProxyProtocol.data_received ──► MySqlSession.from_client ──► upstream
    client ◄── MySqlSession.from_server ◄── _MySqlUpstreamProtocol.data_received ◄── server

Differences from a plain TCP session (router/tcp_proxy.py, which this extends): every chunk
goes through the session filter (l7/mysql_filter.py); the server speaks first, so the upstream
is opened at once, as for TCP, but the client is read right away (its bytes are queued until
the upstream is connected). An SSLRequest is answered by a TLS handshake with the client
when the listener has ``tls``; the server is spoken to in clear. A rate limit with
``over: delay`` stops reading the client until the delay is over.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, cast

from l7.mysql_filter import MySqlSession
from l7.sql_context import SqlContext
from router.cluster import Cluster, Endpoint
from router.tcp_proxy import TcpProxyProtocol, _UpstreamProtocol

if TYPE_CHECKING:
    from router.listeners import ListenerHandle

log = logging.getLogger("pointsman.router.mysql")


class MySqlProxyProtocol(TcpProxyProtocol):
    """The client side of a MySQL session."""

    __slots__ = ("_delay", "_tls_task", "session")

    def __init__(self, listener: ListenerHandle) -> None:
        super().__init__(listener)
        self.session: MySqlSession | None = None
        self._delay: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task[None] | None = None

    def _context(self) -> SqlContext:
        ctx = self.listener.sql
        assert ctx is not None
        return ctx

    def _accepted(self, transport: asyncio.Transport, cluster: Cluster) -> None:
        peer = transport.get_extra_info("peername")
        self.session = MySqlSession(self._context, self._to_server, self._to_client, self, peer[0] if peer else "")
        self._start_connect(cluster)

    # -- bytes ------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is not None:
            session.from_client(data)

    def _to_server(self, data: bytes) -> None:
        up = self._up_transport
        if up is None:
            self._pending.append(data)  # connecting: _adopt flushes these
            return
        up.write(data)
        self._bytes.inc(self._bytes_key, len(data))

    def _to_client(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _make_upstream(self, endpoint: Endpoint) -> asyncio.Protocol:
        return _MySqlUpstreamProtocol(self, endpoint)

    # -- MySqlHooks -------------------------------------------------------------------------------

    def start_tls(self) -> None:
        context = self.listener.sql_tls
        if context is None or self.transport is None:
            self.close("TLS is not configured")
            return
        self.transport.pause_reading()
        self._tls_task = asyncio.get_running_loop().create_task(self._handshake(context), name="mysql-tls")

    async def _handshake(self, context: ssl.SSLContext) -> None:
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(transport, self, context, server_side=True, ssl_handshake_timeout=10.0)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("TLS handshake with a client of %s failed: %s", self.listener.name, exc)
            new = None
        if new is None:
            transport.abort()
            return
        self.transport = cast(asyncio.Transport, new)
        if self._up is not None:
            self._up.peer = self.transport  # back-pressure pauses the TLS transport now

    def pause(self, seconds: float) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.pause_reading()
        self._delay = asyncio.get_running_loop().call_later(seconds, self._resume)

    def _resume(self) -> None:
        self._delay = None
        session = self.session
        if session is None or self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        session.resume()

    def close(self, reason: str) -> None:
        log.debug("listener %s: closing a session: %s", self.listener.name, reason)
        if self._up_transport is not None:
            self._up_transport.close()
        if self.transport is not None:
            self.transport.close()

    # -- end ----------------------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if self._delay is not None:
            self._delay.cancel()
            self._delay = None
        if self._tls_task is not None and not self._tls_task.done():
            self._tls_task.cancel()
        if self.session is not None:
            self.session.end()
        super().connection_lost(exc)


class _MySqlUpstreamProtocol(_UpstreamProtocol):
    """The server side: every chunk goes through the session filter."""

    __slots__ = ("my",)

    def __init__(self, session: MySqlProxyProtocol, endpoint: Endpoint) -> None:
        super().__init__(session, endpoint)
        assert session.session is not None
        self.my = session.session

    def data_received(self, data: bytes) -> None:
        self.my.from_server(data)
        self.bytes.inc(self.bytes_key, len(data))
