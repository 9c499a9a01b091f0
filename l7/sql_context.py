"""What an SQL session filter (l7/pg_filter.py, l7/mysql_filter.py) is given: per-listener
context, the counters it writes to, and the hooks of the proxy around it. Kept apart so that
the proxies (router/pg_proxy.py, router/mysql_proxy.py) and the listener set-up
(router/listeners.py) depend on these small contracts, not on the filters' internals.

Label keys. Every per-session series starts with the session's *who* prefix,
``(listener, protocol, app, version, instance, node)`` (:meth:`SqlContext.who`), built once
when the session's identity is known; the members below list what follows it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from l7.classify import SqlClassifier
from l7.model import Identity
from l7.policy import PolicyEngine
from l7.policy_config import PolicyRule


class Counter(Protocol):
    def inc(self, key: tuple[str, ...], amount: float = 1) -> None: ...


class Histogram(Protocol):
    def observe(self, key: tuple[str, ...], value: float) -> None: ...


class SqlMetrics(Protocol):
    """Where a session counts (read-only members; label keys given per member)."""

    @property
    def statements(self) -> Counter: ...  # who..., database, verb

    @property
    def durations(self) -> Histogram: ...  # who..., verb

    @property
    def denied(self) -> Counter: ...  # who..., rule

    @property
    def delayed(self) -> Counter: ...  # who..., rule

    @property
    def errors(self) -> Counter: ...  # who..., sqlstate_class

    @property
    def transactions(self) -> Counter: ...  # who..., outcome (committed | rolled_back)

    @property
    def sessions(self) -> Counter: ...  # who...

    @property
    def active(self) -> Counter: ...  # who... (incremented and decremented)

    @property
    def policy_matches(self) -> Counter: ...  # rule, action

    @property
    def decode_errors(self) -> Counter: ...  # listener, protocol, side (client | server)

    def app_label(self, app: str) -> str:
        """The ``app`` label of an app the client claims (a bounded set of values)."""
        ...


class PgHooks(Protocol):
    """What the session asks of the proxy around it."""

    def connect_upstream(self) -> None:
        """The startup packet arrived: open the server connection (bytes written to the
        server before it is open are queued by the proxy)."""

    def start_tls(self) -> None:
        """``S`` was written to the client: wrap the client connection in TLS. Bytes that
        arrive after it are decrypted before :meth:`PgSession.from_client` sees them."""

    def cancel(self, pid: int, secret: bytes, raw: bytes) -> None:
        """A CancelRequest: send ``raw`` to the server that owns backend ``pid``, then close."""

    def backend_key(self, pid: int, secret: bytes) -> None:
        """The server named this session's backend (for routing a later CancelRequest)."""

    def pause(self, seconds: float) -> None:
        """Stop reading the client and call :meth:`PgSession.resume` after ``seconds``."""

    def close(self, reason: str) -> None:
        """Close both sides now."""


@dataclass
class SqlContext:
    """Per listener, swapped whole on reload; a session reads the current one per message."""

    listener: str
    metrics: SqlMetrics
    classifier: SqlClassifier
    # postgres: for sessions with standard_conforming_strings = off; mysql: for servers in
    # NO_BACKSLASH_ESCAPES mode (the other way round: the default mysql one has escapes)
    classifier_bs: SqlClassifier
    protocol: str = "postgres"  # the `protocol` label: postgres | mysql
    engine: PolicyEngine | None = None
    rules: list[PolicyRule] = field(default_factory=list)  # what the engine was built from
    identity: Identity | None = None  # the listener's fixed identity (sidecar use)
    # Placement-derived identity: the instance that owns a client address, for instances with
    # addresses of their own (network namespaces, containers); None when none does.
    identify: Callable[[str], Identity | None] | None = None
    tls: bool = False  # answer SSLRequest with S and terminate TLS
    clock: Callable[[], float] = field(default=lambda: 0.0)  # monotonic, for latencies
    wallclock: Callable[[], float] = field(default=lambda: 0.0)  # unix time, for windows

    def resolve(self, peer: str, fallback: str) -> Identity:
        """A session's identity: the listener's, else the placement table's for the client
        address ``peer``, else ``fallback`` (application_name or program_name, else the user)
        as the app."""
        if self.identity is not None:
            return self.identity
        if self.identify is not None and peer:
            placed = self.identify(peer)
            if placed is not None:
                return placed
        return Identity(fallback, claimed=True)

    def who(self, identity: Identity) -> tuple[str, ...]:
        """The label prefix of every per-session series (see the module docstring). A claimed
        app is labelled through ``metrics.app_label`` (bounded); policies still see the app."""
        labels = identity.labels()
        if identity.claimed:
            labels = (self.metrics.app_label(identity.app), *labels[1:])
        return (self.listener, self.protocol, *labels)
