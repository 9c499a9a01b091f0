"""MySQL / MariaDB listener: a TCP session with the l7 session filter in both directions.

Data flow::

    client ──► MySqlProxyProtocol.data_received ──► MySqlSession.from_client ──► upstream
    client ◄── MySqlSession.from_server ◄── _MySqlUpstreamProtocol.data_received ◄── server

Differences from a plain TCP session (router/tcp_proxy.py, which this extends): every chunk
goes through the session filter (l7/mysql_filter.py); the server speaks first, so the upstream
is opened at once, as for TCP, but the client is read right away (its bytes are queued until
the upstream is connected). A rate limit with ``over: delay`` stops reading the client until
the delay is over.

TLS towards the client (listener ``tls``; the server is spoken to in clear) runs over memory
BIOs (:class:`_ClientTls`) rather than ``loop.start_tls``: a MySQL client sends its ClientHello
right behind the SSLRequest without waiting for an answer, so both can arrive in one read, and
the bytes already read must go to the TLS layer. TLS has no half-close, so the server ending
its side closes the client connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from l7.mysql_filter import MySqlSession
from router.cluster import Cluster, Endpoint
from router.sql_proxy import SqlProxyProtocol
from router.tcp_proxy import _UpstreamProtocol

if TYPE_CHECKING:
    from router.listeners import ListenerHandle

log = logging.getLogger("pointsman.router.mysql")


class MySqlProxyProtocol(SqlProxyProtocol):
    """The client side of a MySQL session."""

    __slots__ = ("_tls",)

    def __init__(self, listener: ListenerHandle) -> None:
        super().__init__(listener)
        self._tls: _ClientTls | None = None

    def _accepted(self, transport: asyncio.Transport, cluster: Cluster) -> None:
        peer = transport.get_extra_info("peername")
        self.session = MySqlSession(self._context, self._to_server, self._to_client, self, peer[0] if peer else "")
        self._start_connect(cluster)

    # -- bytes ------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        tls = self._tls
        if tls is not None:
            try:
                data, reply = tls.feed(data)
            except (ssl.SSLError, EOFError) as exc:
                log.info("listener %s: TLS with a client ended: %s", self.listener.name, exc)
                self.close("TLS ended")
                return
            if reply and self.transport is not None:
                self.transport.write(reply)
            if not data:
                return
        session.from_client(data)

    def _to_client(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data if self._tls is None else self._tls.wrap(data))

    def _make_upstream(self, endpoint: Endpoint) -> asyncio.Protocol:
        return _MySqlUpstreamProtocol(self, endpoint)

    # -- MySqlHooks -------------------------------------------------------------------------------

    def start_tls(self, early: bytes = b"") -> None:
        context = self.listener.sql_tls
        if context is None or self.transport is None:
            self.close("TLS is not configured")
            return
        self._tls = _ClientTls(context)
        if early:
            self.data_received(early)

    # -- end ----------------------------------------------------------------------------------------

    def _upstream_eof(self) -> None:
        if self._tls is None:
            super()._upstream_eof()
        elif self.transport is not None:
            self.transport.write(self._tls.close())
            self.transport.close()  # no half-close in TLS: the session is over


class _ClientTls:
    """Server-side TLS over memory BIOs: ciphertext in, plaintext out, and back."""

    __slots__ = ("incoming", "obj", "outgoing", "pending", "ready")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.ready = False
        self.pending: list[bytes] = []  # plaintext written before the handshake completed

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Ciphertext from the client: (plaintext for the session, bytes to send back).
        Raises ssl.SSLError on a failed handshake or bad record, EOFError on close_notify."""
        self.incoming.write(data)
        if not self.ready:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return b"", self.outgoing.read()
            self.ready = True
            for held in self.pending:
                self.obj.write(held)
            self.pending.clear()
        plain: list[bytes] = []
        while True:
            try:
                chunk = self.obj.read(262144)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError as exc:
                raise EOFError("the client closed TLS") from exc
            if not chunk:
                break
            plain.append(chunk)
        return b"".join(plain), self.outgoing.read()

    def wrap(self, data: bytes) -> bytes:
        if not self.ready:
            self.pending.append(data)
            return b""
        self.obj.write(data)
        return self.outgoing.read()

    def close(self) -> bytes:
        """close_notify, best effort."""
        try:
            self.obj.unwrap()
        except ssl.SSLError:
            pass
        return self.outgoing.read()


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
