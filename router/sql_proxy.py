"""What the SQL listeners' client sides share (router/pg_proxy.py, router/mysql_proxy.py): a
TCP session (router/tcp_proxy.py) whose bytes go through a sans-IO session filter from l7/,
and the hooks that filter calls for a rate-limit delay and to close the session."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from l7.sql_context import SqlContext
from router.tcp_proxy import TcpProxyProtocol

if TYPE_CHECKING:
    from router.listeners import ListenerHandle

log = logging.getLogger("pointsman.router.sql")


class SqlSession(Protocol):
    """A session filter as the proxy sees it (l7.pg_filter.PgSession, l7.mysql_filter.MySqlSession)."""

    def from_client(self, data: bytes) -> None: ...

    def from_server(self, data: bytes) -> None: ...

    def resume(self) -> None: ...

    def end(self) -> None: ...


class SqlProxyProtocol(TcpProxyProtocol):
    """The client side of one SQL session; a subclass makes ``session`` in ``_accepted``."""

    __slots__ = ("_delay", "session")

    def __init__(self, listener: ListenerHandle) -> None:
        super().__init__(listener)
        self.session: SqlSession | None = None
        self._delay: asyncio.TimerHandle | None = None

    def _context(self) -> SqlContext:
        """The listener's current context (swapped whole on reload; sessions read it per message)."""
        ctx = self.listener.sql
        assert ctx is not None
        return ctx

    def _to_server(self, data: bytes) -> None:
        up = self._up_transport
        if up is None:
            self._pending.append(data)  # connecting: _adopt flushes these
            return
        up.write(data)
        self._bytes.inc(self._bytes_key, len(data))

    # -- hooks the filters call -------------------------------------------------------------------

    def pause(self, seconds: float) -> None:
        """A rate-limit delay: stop reading the client, resume the session after ``seconds``
        (its later messages queue behind, in order)."""
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
        if self.session is not None:
            self.session.end()
        super().connection_lost(exc)
