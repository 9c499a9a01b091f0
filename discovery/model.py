"""Shared types of the discovery package: services, instances, their health, and the catalog
(the in-memory view of the registry that DNS and the router read).

The catalog is what readers see; the registry (discovery/registry.py) owns the state store and
is the only writer. Readers never block the writer: they get immutable snapshots, and
``Catalog.subscribe`` tells them (synchronously, on the event loop) when a new snapshot is in
place, so a DNS answer or a router endpoint set can be rebuilt within one loop iteration of a
registration.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Health = Literal["passing", "warning", "critical"]
HEALTH_ORDER: dict[str, int] = {"passing": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance of a service, as registered (statically, by API, or by the scheduler)."""

    id: str
    service: str
    address: str  # an IPv4 or IPv6 literal
    ports: Mapping[str, int] = field(default_factory=dict)  # named ports: {"http": 8080}
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1
    node: str | None = None
    version: str | None = None
    health: Health = "passing"

    @property
    def ipv6(self) -> bool:
        return ipaddress.ip_address(self.address).version == 6


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every service's instances at one registry revision. Immutable: replaced, not edited."""

    revision: int
    services: Mapping[str, tuple[Instance, ...]]  # service -> instances sorted by id

    def instances(self, service: str) -> tuple[Instance, ...]:
        return self.services.get(service, ())

    def usable(self, service: str) -> tuple[Instance, ...]:
        """What clients should be sent to: the passing instances, or the warning ones when
        none pass (critical ones never)."""
        all_ = self.services.get(service, ())
        passing = tuple(i for i in all_ if i.health == "passing")
        return passing or tuple(i for i in all_ if i.health == "warning")


EMPTY = Snapshot(0, {})

Listener = Callable[[Snapshot], None]


class Catalog:
    """Holds the current snapshot and calls subscribers when it changes."""

    def __init__(self) -> None:
        self.snapshot: Snapshot = EMPTY
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(snapshot)`` now and on every change; returns the unsubscribe."""
        self._listeners.append(listener)
        listener(self.snapshot)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def publish(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        for listener in list(self._listeners):
            listener(snapshot)
