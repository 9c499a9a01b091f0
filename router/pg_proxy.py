"""PostgreSQL listener: a TCP session with the l7 session filter in both directions.

Data flow::

    client ──► PgProxyProtocol.data_received ──► PgSession.from_client ──► upstream transport
    client ◄── PgSession.from_server ◄── _PgUpstreamProtocol.data_received ◄── server

Differences from a plain TCP session (router/tcp_proxy.py, which this extends):

- The upstream is opened only once the client's first packet is known: a StartupMessage
  goes to an endpoint the balancer picks; a CancelRequest must reach the server that runs the
  backend it names, so it is sent to the endpoint recorded for that (pid, key) when the
  session began (``ListenerHandle.pg_backends``), over a connection of its own.
- SSLRequest is answered here: ``N`` without ``tls`` (an ``sslmode=prefer`` client goes on in
  clear), ``S`` and a TLS handshake with it; the server is spoken to in clear.
- Policy can hold a statement (rate limit with ``over: delay``): the client is not read until
  the delay is over, so its later statements queue behind, in order.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, cast

from l7.pg_filter import PgSession
from router.cluster import Cluster, Endpoint
from router.sql_proxy import SqlProxyProtocol
from router.tcp_proxy import _UpstreamProtocol

if TYPE_CHECKING:
    from router.listeners import ListenerHandle

log = logging.getLogger("pointsman.router.pg")


class PgProxyProtocol(SqlProxyProtocol):
    """The client side of a PostgreSQL session."""

    __slots__ = ("_backend", "_tls_task")

    def __init__(self, listener: ListenerHandle) -> None:
        super().__init__(listener)
        self._backend: tuple[int, bytes] | None = None
        self._tls_task: asyncio.Task[None] | None = None

    def _accepted(self, transport: asyncio.Transport, cluster: Cluster) -> None:
        # Read the first packet before connecting: it says where to connect (or not at all).
        peer = transport.get_extra_info("peername")
        self.session = PgSession(self._context, self._to_server, self._to_client, self, peer[0] if peer else "")

    # -- bytes ------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        session.from_client(data)

    def _to_client(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _make_upstream(self, endpoint: Endpoint) -> asyncio.Protocol:
        return _PgUpstreamProtocol(self, endpoint)

    # -- PgHooks --------------------------------------------------------------------------------

    def connect_upstream(self) -> None:
        cluster = self._cluster
        if cluster is not None and self._connect_task is None:
            self._start_connect(cluster)

    def start_tls(self) -> None:
        context = self.listener.sql_tls
        if context is None or self.transport is None:
            self.close("TLS is not configured")
            return
        self.transport.pause_reading()
        self._tls_task = asyncio.get_running_loop().create_task(self._handshake(context), name="pg-tls")

    async def _handshake(self, context: ssl.SSLContext) -> None:
        transport = self.transport
        assert transport is not None
        new = await _upgrade(transport, self, context, server_side=True, peer=f"a client of {self.listener.name}")
        if new is not None:
            self.transport = new

    def cancel(self, pid: int, secret: bytes, raw: bytes) -> None:
        endpoint = self.listener.pg_backends.get((pid, secret))
        transport = self.transport
        if transport is not None:
            transport.close()
        if endpoint is None:
            log.debug("listener %s: CancelRequest for an unknown backend %d", self.listener.name, pid)
            return
        task = asyncio.get_running_loop().create_task(_send_cancel(endpoint, raw), name="pg-cancel")
        self.listener.track(task)

    def backend_key(self, pid: int, secret: bytes) -> None:
        endpoint = self._endpoint
        if endpoint is not None:
            self._backend = (pid, secret)
            self.listener.pg_backends[self._backend] = endpoint

    # -- end ----------------------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tls_task is not None and not self._tls_task.done():
            self._tls_task.cancel()
        if self._backend is not None:
            self.listener.pg_backends.pop(self._backend, None)
            self._backend = None
        super().connection_lost(exc)

    def _upstream_lost(self, up: _UpstreamProtocol) -> None:
        if self._backend is not None:
            self.listener.pg_backends.pop(self._backend, None)
            self._backend = None
        super()._upstream_lost(up)


class _PgUpstreamProtocol(_UpstreamProtocol):
    """The server side: every chunk goes through the session filter. With ``tls.upstream:
    require`` it first asks the server for TLS (SSLRequest, one-byte answer) and joins the
    session only once the handshake is done, so the startup packet is never sent in clear."""

    __slots__ = ("_tls_task", "adopted", "negotiating", "pg")

    def __init__(self, session: PgProxyProtocol, endpoint: Endpoint) -> None:
        super().__init__(session, endpoint)
        assert session.session is not None
        self.pg = session.session
        tls = session.listener.config.tls
        self.negotiating = tls is not None and tls.upstream == "require"
        self.adopted = False
        self._tls_task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.negotiating:
            self.adopted = True
            super().connection_made(transport)
            return
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(SSL_REQUEST)

    def data_received(self, data: bytes) -> None:
        if self.negotiating:
            self._negotiate(data)
            return
        self.pg.from_server(data)
        self.bytes.inc(self.bytes_key, len(data))

    def _negotiate(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        self.negotiating = False
        if data != b"S":  # "N": the server has no TLS; anything else: not a PostgreSQL server
            log.warning("server %s refused TLS (tls.upstream: require): closing", self.endpoint.key)
            transport.close()
            return
        transport.pause_reading()
        self._tls_task = asyncio.get_running_loop().create_task(self._handshake(transport), name="pg-upstream-tls")

    async def _handshake(self, transport: asyncio.Transport) -> None:
        new = await _upgrade(
            transport, self, _upstream_context(), server_side=False, peer=f"server {self.endpoint.key}"
        )
        if new is not None:
            self.adopted = True
            super().connection_made(new)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tls_task is not None and not self._tls_task.done():
            self._tls_task.cancel()
        if self.adopted:
            super().connection_lost(exc)
            return
        # Never joined the session: undo what the connect did and end the client too.
        self.endpoint.active -= 1
        self.peer.close()


SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
_UPSTREAM_TLS: list[ssl.SSLContext] = []


def _upstream_context() -> ssl.SSLContext:
    """As libpq's sslmode=require: encrypted, the certificate not verified."""
    if not _UPSTREAM_TLS:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _UPSTREAM_TLS.append(context)
    return _UPSTREAM_TLS[0]


async def _upgrade(
    transport: asyncio.Transport, protocol: asyncio.Protocol, context: ssl.SSLContext, *, server_side: bool, peer: str
) -> asyncio.Transport | None:
    """TLS on an open connection (after the SSLRequest's "S"); None, with the connection
    aborted, when the handshake fails."""
    loop = asyncio.get_running_loop()
    try:
        new = await loop.start_tls(transport, protocol, context, server_side=server_side, ssl_handshake_timeout=10.0)
    except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
        log.info("TLS handshake with %s failed: %s", peer, exc)
        new = None
    if new is None:
        transport.abort()
        return None
    return cast(asyncio.Transport, new)


async def _send_cancel(endpoint: Endpoint, raw: bytes) -> None:
    """A CancelRequest is a connection of its own: send the 16 bytes, the server closes."""
    try:
        async with asyncio.timeout(5.0):
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
            try:
                writer.write(raw)
                await writer.drain()
                await reader.read()  # the server closes without answering
            finally:
                writer.close()  # also when cancelled (the listener stopping) or timed out
    except (OSError, TimeoutError) as exc:
        log.info("cancel request to %s failed: %s", endpoint.key, exc)
