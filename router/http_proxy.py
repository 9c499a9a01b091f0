"""The HTTP/1.1 proxy of a listener: one :class:`HttpProxyProtocol` per client connection.

Built on ``asyncio.Protocol`` and httptools callbacks, with no task per request. This module
is the client half: the request parser's callbacks fill a :class:`~router.http_request.Request`
(``on_url`` starts one, ``on_header`` sorts headers into "forward as is" and "the proxy looks
at this", ``on_headers_complete`` routes it with the listener's table of that moment), and the
upstream half (:class:`~router.http_exchange.HttpExchange`) forwards it when it reaches the
front of the queue.

Pipelined requests are answered in order: httptools may parse several requests out of one
read, so requests wait in ``queue`` and reading pauses while more than one is queued. Reading
also pauses while the upstream socket's write buffer is full, and the upstream connection
stops reading while the client's is (back-pressure both ways). Header, idle and response
timeouts share one lazily re-armed timer per connection.

Refused input (malformed, ambiguous length, header too large or too slow) is answered, counted
in ``http_rejected`` by reason, and ends the connection; nothing of it reaches an upstream.

Keep-alive clients repeat themselves, so a connection remembers a little of its last request:
the routing decision (``rc_*``: same table, host, method and path), the upstream head
(``hc_*``, see ``HttpExchange._build_head``), and the request object itself when it took the
plain path (``spare``, see ``Request.renew``). Each is checked against what could differ.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser, parse_url

from router import http_memory
from router.http_exchange import HttpExchange
from router.http_headers import (
    CRLF,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_EXPECT,
    H_HOP,
    H_HOST,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    H_VIA,
    H_XF_HOST,
    H_XF_PROTO,
    H_XFF,
    KIND_CACHE,
    LAST_CHUNK,
    SEP,
    chunk,
    header_kind,
    parse_connection,
)
from router.http_labels import labels_for
from router.http_request import Request
from router.http_states import M_LINGER, M_NORMAL, M_TUNNEL, M_UPGRADING, P_DEAD, P_PIPELINE, P_WAIT, T_HEADERS
from router.routes import normalise_host

if TYPE_CHECKING:
    from router.cluster import Cluster
    from router.listeners import ListenerHandle
    from router.routes import Route, RouteTable

# Large responses would otherwise pay for page faults on memory glibc just gave back (see there).
http_memory.tune_malloc()

WAIT_BUFFER = 64 * 1024  # body bytes held while waiting for an upstream connection
_kind_of = KIND_CACHE.get  # one global load and a call per header, no method lookup
_NO_HEADERS: dict[str, str] = {}


class _Reject(Exception):
    """Raised inside a parser callback to refuse the request being parsed."""

    def __init__(self, status: int, reason: str, body: bytes) -> None:
        super().__init__(status, reason, body)
        self.status = status
        self.reason = reason
        self.body = body


class HttpProxyProtocol(HttpExchange):
    __slots__ = (
        "head_bytes",
        "head_raw",
        "in_headers",
        "max_header_bytes",
        "parser",
        "rc_cluster",
        "rc_host",
        "rc_method",
        "rc_path",
        "rc_route",
        "rc_table",
        "rc_url",
    )

    def __init__(self, listener: ListenerHandle) -> None:
        super().__init__(listener)
        self.max_header_bytes = listener.config.http.max_header_bytes
        self.parser = HttpRequestParser(self)
        self.in_headers = False
        self.head_bytes = 0  # request line + header bytes of the request being parsed
        self.head_raw = 0  # bytes of reads that held nothing but (unfinished) header
        # A one-entry cache of the last routing decision (see on_headers_complete).
        self.rc_table: RouteTable | None = None
        self.rc_url = b""
        self.rc_path = b""
        self.rc_host = b""
        self.rc_method = b""
        self.rc_route: Route | None = None
        self.rc_cluster: Cluster | None = None  # None: the route splits (or there is none)

    # -- connection lifecycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        listener = self.listener
        if peer:
            self.client_ip = str(peer[0]).encode()
        # Who the client is: the listener's configured identity (a sidecar's), else the instance
        # that owns the client address in the placement table.
        identity = listener.source
        if identity is None and peer and listener.identify is not None:
            identity = listener.identify(str(peer[0]))
        if identity is not None:
            self.who = identity.labels()
            self.last_labels = self.no_route_labels = labels_for(self.name, self.who, "", "")
        listener.add(self)
        self.stats.downstream_connections.inc((self.name,))
        # The first request's head must arrive within header_timeout of the connect.
        self._arm(T_HEADERS, self.loop.time() + self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.remove(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conn, self.conn = self.conn, None
        if conn is not None:
            if self.mode == M_TUNNEL:
                conn.close()  # flush what the client sent last
            elif conn.owner is self:
                if self.queue and self.queue[0].connecting:
                    conn.owner = None  # let the connect finish: the connection is then pooled
                else:
                    conn.abort()  # mid-request: it cannot be reused
        for req in self.queue:
            req.done = True
            self._release(req)
            if req.counted:
                req.counted = False
                assert req.cluster is not None
                req.cluster.requests -= 1
        self.queue.clear()

    def begin_drain(self) -> None:
        """Finish the request in flight (its response says Connection: close), then close;
        close at once when idle."""
        self.draining = True
        self.no_more = True
        if not self.queue and self.parsing is None and self.mode != M_TUNNEL:
            self._close()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.conn is not None:
            self.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.conn is not None:
            self.conn.resume_reading()

    # -- reading -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.mode:
            self._special_data(data)
            return
        if self.no_more and self.parsing is None:
            return  # after Connection: close or an error, nothing more is read
        was_in_headers = self.in_headers
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.mode = M_UPGRADING
            rest = data[exc.args[0] :]
            if rest:
                self.early.append(rest)
            self._pause(P_WAIT)
        except HttpParserCallbackError as exc:
            reject = exc.__context__
            if not isinstance(reject, _Reject):
                raise
            self._reject(reject.status, reject.reason, reject.body)
        except HttpParserError as exc:
            if not (self.no_more and self.parsing is None):  # else: bytes after Connection: close
                message = str(exc)
                if "Content-Length" in message or "Transfer-Encoding" in message:
                    self._reject(400, "ambiguous_length", b"ambiguous request length\n")
                else:
                    self._reject(400, "malformed", b"malformed request\n")
        else:
            if was_in_headers and self.in_headers:
                # The whole read was header bytes (the callbacks only count completed
                # headers; httptools buffers a partial one itself).
                self.head_raw += len(data)
                if self.head_raw > self.max_header_bytes:
                    self._reject(431, "header_too_large", b"request header too large\n")
        queue = self.queue
        if queue and not self.kicking:
            req = queue[0]
            if not req.started and not self.closed:
                # _kick without its loop: a request answered locally from here finishes
                # through _finish, which kicks the rest of the queue itself.
                self._start(req)

    def _special_data(self, data: bytes) -> None:
        mode = self.mode
        if mode == M_TUNNEL:
            if self.conn is not None:
                self.conn.write(data)
        elif mode == M_UPGRADING:
            # Sent after an Upgrade request, before the upstream's answer: held (reading is
            # paused) and written to the tunnel if the upstream switches protocols.
            self.early.append(data)
            self._pause(P_WAIT)
        # M_LINGER: discarded

    def eof_received(self) -> bool | None:
        mode = self.mode
        if mode == M_LINGER:
            return None
        if mode == M_TUNNEL:
            self.eof_in = True
            if self.conn is not None:
                self.conn.write_eof()
            if self.eof_out:
                self._close()
            return True
        if self.queue and self.parsing is None:
            # The client half-closed after sending whole requests: answer, then close (as
            # HAProxy does without abortonclose). A client that leaves mid-request is gone:
            # returning None closes, and connection_lost releases the upstream.
            self.no_more = True
            self.queue[-1].close_after = True
            return True
        return None

    # -- request parser callbacks --------------------------------------------------------------
    # There is no on_message_begin: the first callback of a request is on_url, which starts
    # it (one Python call less per request).

    def on_url(self, url: bytes) -> None:
        req = self.parsing
        if req is None:
            now = perf_counter()
            spare = self.spare
            if spare is not None:
                # The connection's last request, done with and plain (see _finish): renewing
                # it costs less than making a new one.
                self.spare = None
                spare.renew(now, url)
                self.parsing = spare
            else:
                self.parsing = Request(now, url)
            self.in_headers = True
            self.head_bytes = len(url)
            self.head_raw = 0
            if not self.queue:
                deadline = self.deadline = now + self.header_timeout  # _arm(T_HEADERS), inlined
                self.timer_kind = T_HEADERS
                if self.timer is None or self.timer_at > deadline:
                    self._arm(T_HEADERS, deadline)
        else:
            req.url += url
            self.head_bytes += len(url)
        if self.head_bytes > self.max_header_bytes:
            raise _Reject(431, "header_too_large", b"request line too long\n")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_headers:
            return  # a trailer field after a chunked body: not forwarded
        head_bytes = self.head_bytes = self.head_bytes + len(name) + len(value) + 4
        if head_bytes > self.max_header_bytes:
            raise _Reject(431, "header_too_large", b"request header too large\n")
        req = self.parsing
        assert req is not None
        kind = _kind_of(name)
        if kind is None:
            kind = header_kind(name)
        if not kind:
            req.parts += (name, SEP, value, CRLF)
            return
        if kind == H_HOST:
            req.host = value
            req.parts += (name, SEP, value, CRLF)
            return
        req.odd = True
        if kind == H_CONTENT_LENGTH:
            req.parts.extend((name, SEP, value, CRLF))
        elif kind == H_CONNECTION:
            extra = parse_connection(value)[1]
            if extra:
                req.conn_extra = extra if req.conn_extra is None else req.conn_extra | extra
        elif kind == H_TRANSFER_ENCODING:
            if value.strip().lower() != b"chunked":
                # Other codings would have to be forwarded with the chunked framing we
                # re-create; Envoy refuses them too.
                raise _Reject(501, "malformed", b"unsupported transfer-encoding\n")
            req.chunked = True
        elif kind == H_UPGRADE:
            req.upgrade_value = value
        elif kind == H_EXPECT:
            if value.strip().lower() == b"100-continue":
                req.expect_continue = True  # answered by the proxy itself
            else:
                req.parts.extend((name, SEP, value, CRLF))
        elif kind == H_HOP:
            pass  # keep-alive, proxy-connection, te, trailer: never forwarded, xff or not
        elif not self.forwarded:
            req.parts.extend((name, SEP, value, CRLF))
        elif kind == H_XFF:
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif kind == H_XF_HOST:
            req.xfh = True
            req.parts.extend((name, SEP, value, CRLF))
        elif kind == H_VIA:
            req.via = value if req.via is None else req.via + b", " + value
        elif kind == H_XF_PROTO:
            pass  # replaced by ours

    def on_headers_complete(self) -> None:
        req = self.parsing
        assert req is not None
        self.in_headers = False
        parser = self.parser
        method = req.method = parser.get_method()
        keep_alive = parser.should_keep_alive()
        # Without a Connection (or Proxy-Connection) field llhttp's keep-alive answer is the
        # version's default: True only for HTTP/1.1, so no need to ask for the version, which
        # httptools formats as a string (~0.15 us) on each call.
        if not keep_alive or req.odd:
            req.http10 = parser.get_http_version() == "1.0"  # else False, as the request starts
        if not keep_alive or self.no_more:
            req.keep_alive = False  # else True, as the request starts
        if req.upgrade_value is not None:  # llhttp's upgrade flag needs an Upgrade header
            req.upgrade = parser.should_upgrade()
        if method == b"CONNECT":
            raise _Reject(405, "unsupported", b"CONNECT is not supported\n")
        url = req.url
        if url and url[0] != 47 and url[:7].lower() in (b"http://", b"https:/"):
            # absolute-form (a client talking to us as a forward proxy): its authority wins
            # over Host, and the upstream gets origin-form.
            parsed = parse_url(url)
            if parsed.host:
                authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
                if not req.host:
                    req.parts.extend((b"Host", SEP, authority, CRLF))
                req.host = authority
            req.url = url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        host = req.host
        if not host and not req.http10:
            raise _Reject(400, "malformed", b"missing Host header\n")
        # Route now, with the table of this moment; a reload later does not affect it.
        table = self.listener.table
        if table is not None:
            if (
                table is self.rc_table
                and host == self.rc_host
                and method == self.rc_method
                and (url == self.rc_url or self._same_path(url))
            ):
                # The same route question as this connection's previous request (keep-alive
                # clients repeat themselves): the same answer, for the same table.
                route = self.rc_route
                cluster = self.rc_cluster
            else:
                route, cluster = self._route(req, table)
            if route is not None:
                req.route = route
                if cluster is None:
                    cluster = route.pick_cluster()  # a weighted split: chosen per request
                req.cluster = cluster
                if cluster.hashed:
                    req.hash_key = self._hash_key(req, cluster)
        if (
            url == self.hc_url
            and method == self.hc_method
            and host == self.hc_host
            and req.parts == self.hc_parts
            and (not req.odd or req.cacheable_head())
        ):
            # The same head as this connection's last one that was built (see _build_head),
            # and nothing else that goes into it: build_head would return the same bytes.
            req.head = self.hc_head
        queue = self.queue
        queue.append(req)
        if len(queue) > 1:
            self._pause(P_PIPELINE)

    def _same_path(self, url: bytes) -> bool:
        """The route cache's second chance: another query string on the same path."""
        q = url.find(b"?")
        if (url if q < 0 else url[:q]) != self.rc_path:
            return False
        self.rc_url = url
        return True

    def _route(self, req: Request, table: RouteTable) -> tuple[Route | None, Cluster | None]:
        """Match the table; the cluster is set when the route has only one. Remembered for the
        connection's next request unless the table matches on headers."""
        url = req.url
        q = url.find(b"?")
        raw_path = url if q < 0 else url[:q]
        host = normalise_host(req.host.decode("latin-1"))
        path = raw_path.decode("latin-1")
        if table.uses_headers:
            route = table.match(req.method_str, host, path, req.header_dict(), self.who)
        else:
            route = table.match(req.method_str, host, path, _NO_HEADERS, self.who)
        clusters = route.clusters if route is not None else ()
        cluster = clusters[0] if len(clusters) == 1 else None
        if not table.uses_headers:
            self.rc_table, self.rc_url, self.rc_path, self.rc_host = table, url, raw_path, req.host
            self.rc_method, self.rc_route, self.rc_cluster = req.method, route, cluster
        return route, cluster

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        assert req is not None
        req.body_started = True
        req.add_body(chunk(body) if req.chunked else body)
        if req.pending_size > WAIT_BUFFER:
            self._pause(P_WAIT)

    def on_message_complete(self) -> None:
        req = self.parsing
        assert req is not None
        self.parsing = None
        req.complete = True
        if req.chunked:
            req.add_body(LAST_CHUNK)
        if not req.keep_alive:
            self.no_more = True

    def _hash_key(self, req: Request, cluster: Cluster) -> bytes | None:
        hash_on = cluster.config.hash_on
        if hash_on is None:
            return self.client_ip
        if hash_on.header is not None:
            return req.header(hash_on.header.lower().encode("latin-1"))
        assert hash_on.cookie is not None
        return req.cookie(hash_on.cookie.encode("latin-1"))

    # -- refusing ------------------------------------------------------------------------------

    def _reject(self, status: int, reason: str, body: bytes) -> None:
        """Refuse the request being parsed; the connection closes after the answer."""
        self.stats.http_rejected.inc((self.name, reason))
        self.no_more = True
        self._pause(P_DEAD)
        req = self.parsing
        self.parsing = None
        self.in_headers = False
        if req is None:
            req = Request(perf_counter(), b"")
        if req in self.queue:
            if req.started:
                # The body turned out malformed while it was being forwarded.
                if req.sent:
                    self._finish(req, abort=True)
                else:
                    self._local(req, status, body, close=True)
                return
        else:
            self.queue.append(req)
        req.reject = status
        req.reject_body = body
        req.close_after = True

    def _header_timeout(self) -> None:
        if self.mode == M_NORMAL:
            self._reject(408, "header_timeout", b"request header timeout\n")
            self._kick()
