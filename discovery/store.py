"""The state store contract: a small key-value store with revisions, watches and leases.

The registry keeps everything it knows here. Today the store is embedded SQLite
(``discovery/store_sqlite.py``); when pointsman spans hosts it will be etcd. So the contract is
etcd v3's data model, cut down to what the registry uses, and nothing in it assumes SQLite: a
caller written against :class:`Store` must work unchanged on either.

Semantics (as etcd v3)::

    revision     one counter for the whole store. Every write (put, delete, delete_prefix, a
                 lease revoked or expired with keys on it) is one atomic step that takes the next
                 revision; one step may change several keys, which then share that revision.
                 Reads and lease grants/keepalives do not move it. Revisions start above 0, so
                 0 is never the mod_revision of a key that exists.
    KeyValue     create_revision (the step that created the key since it last did not exist),
                 mod_revision (the step that last wrote it), version (1 on create, +1 per put,
                 gone on delete), lease (the lease the key lives on, or None).
    put/delete   optionally compare-and-swap on the key's mod_revision: ``expect_revision=0``
                 means "must not exist", any other value "mod_revision must equal this"; on a
                 mismatch nothing is written and CasFailed carries the actual mod_revision.
                 A put without ``lease`` detaches the key from any lease it was on (etcd does
                 the same unless asked to ignore the lease).
    list         the keys under a prefix, sorted, with the revision the listing is consistent
                 with: ``watch(prefix, revision + 1)`` then continues without gap or overlap.
    watch        yields batches of events in revision order: first the history from
                 ``from_revision`` on, then live ones. Never a gap, never a duplicate, and a
                 batch never splits a revision, so resuming from "last revision seen + 1" is
                 always exact. A delete event's kv holds only the key and mod_revision = the
                 revision of the delete (etcd's delete events look the same). Asking for
                 history older than what is kept raises Compacted: list again, then watch.
                 Cancelling the consumer or closing the store ends the iteration cleanly.
    leases       ``grant(ttl)`` returns an id; keys put with ``lease=id`` are deleted, as one
                 write with delete events, when the lease is revoked or runs out of time;
                 ``keepalive`` renews it to ttl from now. An expired lease is gone:
                 keepalive/put/revoke with it raise LeaseNotFound, and a holder grants a new
                 one. Lease ids are never reused.
    compact      ``compact(revision)`` drops the history before ``revision``. Implementations
                 may also compact on their own; either way a watcher that falls behind gets
                 Compacted rather than a silent gap.

Errors::

    StoreError          also: not started / closed, and the engine's own failures (disk full,
    │                   I/O error), so callers never catch sqlite3 or gRPC errors
    ├── CasFailed       a compare-and-swap did not match: key, expected, actual mod_revision
    ├── LeaseNotFound   the lease expired, was revoked, or never existed
    └── Compacted       a watch asked for history that has been compacted away
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

EventType = Literal["put", "delete"]


class StoreError(Exception):
    """Base of every error a store raises on purpose (including "not started" / "closed")."""


class CasFailed(StoreError):
    """A write's ``expect_revision`` did not match the key's current mod_revision.

    ``actual`` is 0 when the key does not exist.
    """

    def __init__(self, key: str, expected: int, actual: int) -> None:
        super().__init__(f"compare-and-swap failed on {key!r}: expected revision {expected}, found {actual}")
        self.key = key
        self.expected = expected
        self.actual = actual


class LeaseNotFound(StoreError):
    """The lease has expired, was revoked, or never existed."""

    def __init__(self, lease_id: int) -> None:
        super().__init__(f"lease {lease_id} not found (expired, revoked or unknown)")
        self.lease_id = lease_id


class Compacted(StoreError):
    """A watch asked for ``requested`` but history before ``compact_revision`` is gone."""

    def __init__(self, requested: int, compact_revision: int) -> None:
        super().__init__(
            f"revision {requested} has been compacted; history starts at {compact_revision}: list again, then watch"
        )
        self.requested = requested
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One change. For a delete, ``kv`` is ``KeyValue(key, b"", 0, revision, 0, None)``."""

    type: EventType
    kv: KeyValue
    revision: int


class Store(ABC):
    """The contract (see the module docstring). Use as ``async with store:`` or call
    :meth:`start` before and :meth:`close` after; methods raise StoreError outside of that."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abstractmethod
    async def start(self) -> None:
        """Open the store and start its background work (lease expiry)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop background work, end every watch, release the store. Idempotent."""

    @property
    @abstractmethod
    def revision(self) -> int:
        """The store's current revision (0 before the first write ever)."""

    @abstractmethod
    async def get(self, key: str) -> KeyValue | None: ...

    @abstractmethod
    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """The keys starting with ``prefix`` sorted by key, and the revision they are as of."""

    @abstractmethod
    async def put(self, key: str, value: bytes, *, expect_revision: int | None = None, lease: int | None = None) -> int:
        """Write ``key``; returns the revision of the write. Raises CasFailed, LeaseNotFound."""

    @abstractmethod
    async def delete(self, key: str, *, expect_revision: int | None = None) -> int | None:
        """Delete ``key``; returns the revision of the delete, None if there was no such key."""

    @abstractmethod
    async def delete_prefix(self, prefix: str) -> int | None:
        """Delete every key under ``prefix`` in one revision (returned; None if none existed)."""

    @abstractmethod
    def watch(self, prefix: str, from_revision: int | None = None) -> AsyncGenerator[builtins.list[Event], None]:
        """Events on keys under ``prefix`` with revision >= ``from_revision`` (None: from the
        first write after this call), in batches. The iterator raises Compacted if that history
        is gone. Call it, do not await it: ``async for events in store.watch(p, rev): ...``.
        A generator (not just an iterator) so that a consumer that stops early can close it
        at once (``contextlib.aclosing``): a remote store holds a stream per watch."""

    @abstractmethod
    async def grant(self, ttl: float) -> int:
        """A new lease that expires ``ttl`` seconds from now unless kept alive."""

    @abstractmethod
    async def keepalive(self, lease_id: int) -> None:
        """Renew the lease to its ttl from now. Raises LeaseNotFound."""

    @abstractmethod
    async def revoke(self, lease_id: int) -> int | None:
        """End the lease now, deleting its keys; returns the revision of that delete (None if
        the lease had no keys). Raises LeaseNotFound."""

    @abstractmethod
    async def compact(self, revision: int) -> None:
        """Drop history before ``revision`` (no-op if already dropped; ``revision`` may not be
        past the current revision)."""
