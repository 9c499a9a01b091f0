"""The registry: services and instances kept in the state store, published as a Catalog.

Data flow::

    config services ─┐                       ┌─► Catalog.publish(Snapshot) ─► DNS answers
    HTTP API ────────┼─► Registry ─► Store ──watch──►                       └─► router clusters
    scheduler ───────┤     (writes)   (SQLite, etcd later)
    health checks ───┘

Every write goes to the store; the catalog is rebuilt only from the store's watch. So what
DNS and the router see is exactly what is stored, whoever wrote it (the scheduler, the API,
checks; with etcd later, other processes too: one SQLite file is held by one process), and
a restart rebuilds the same catalog from the store.

Keys::

    services/<service>/<id>   the registration (JSON): address, ports, tags, meta, check, source
    health/<service>/<id>     {"status", "output"}; a TTL check's key lives on a lease, so a
                              missed heartbeat deletes it and the instance turns critical

Health of an instance: its health key if there is one; otherwise ``passing`` when it has no
check, and ``critical`` when it has one (not yet passed, or its TTL ran out), as Consul does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from discovery.checks import CheckRunner
from discovery.model import Catalog, Health, Instance, Snapshot
from discovery.store import Event, LeaseNotFound, Store

log = logging.getLogger("pointsman.discovery")

SERVICES = "services/"
HEALTH = "health/"
_NAME = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"  # one DNS label


def check_address(value: str) -> str:
    """An IPv4 or IPv6 literal, normalised (``::0001`` -> ``::1``)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None


class Check(BaseModel):
    """How an instance's health is known: an HTTP GET, a TCP connect, or a TTL heartbeat."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    http: str | None = Field(default=None, description="path to GET on the instance; 2xx passes, 429 warns")
    tcp: bool = Field(default=False, description="a TCP connect to the port passes")
    port: str | None = Field(default=None, description="named port to check (default: the first)")
    ttl: float | None = Field(default=None, gt=0, description="seconds: heartbeats must come at least this often")
    interval: float = Field(default=5.0, gt=0)
    timeout: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _one_kind(self) -> Check:
        kinds = [self.http is not None, self.tcp, self.ttl is not None]
        if sum(kinds) != 1:
            raise ValueError("a check is exactly one of http, tcp or ttl")
        return self


class Registration(BaseModel):
    """One instance as clients register it (API body, static config, scheduler)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_NAME, description="unique within the service; a DNS label")
    service: str = Field(pattern=_NAME)
    address: str
    ports: dict[str, int] = Field(default_factory=dict)
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = Field(default_factory=dict)
    weight: int = Field(default=1, ge=0, le=65535)
    node: str | None = None
    version: str | None = None
    check: Check | None = None
    source: Literal["api", "config", "scheduler"] = "api"

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        return check_address(value)

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: dict[str, int]) -> dict[str, int]:
        import re

        for name, port in value.items():
            if not re.match(_NAME, name):
                raise ValueError(f"port name {name!r} must be a DNS label (letters, digits, '-')")
            if not 0 < port < 65536:
                raise ValueError(f"port {name}: {port} is not in 1..65535")
        return value

    def key(self) -> str:
        return f"{SERVICES}{self.service}/{self.id}"

    def instance(self, health: Health) -> Instance:
        return Instance(
            id=self.id,
            service=self.service,
            address=self.address,
            ports=dict(self.ports),
            tags=self.tags,
            meta=dict(self.meta),
            weight=self.weight,
            node=self.node,
            version=self.version,
            health=health,
        )


class Registry:
    """Writes registrations and health to the store; keeps the catalog in step with it."""

    def __init__(self, store: Store, catalog: Catalog | None = None) -> None:
        self.store = store
        self.catalog = catalog or Catalog()
        self._regs: dict[str, Registration] = {}  # key -> registration
        self._health: dict[str, tuple[Health, str]] = {}  # "<service>/<id>" -> (status, output)
        self._leases: dict[str, int] = {}  # "<service>/<id>" -> lease of its TTL health key
        self._watch_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self.checks = CheckRunner(self)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load what the store holds, publish it, then follow the store's watch."""
        regs, revision = await self.store.list(SERVICES)
        health, revision2 = await self.store.list(HEALTH)
        revision = max(revision, revision2)
        for kv in regs:
            self._apply_put(kv.key, kv.value)
        for kv in health:
            self._apply_put(kv.key, kv.value)
        self._publish(revision)
        self._watch_task = asyncio.get_running_loop().create_task(self._follow(revision + 1), name="registry-watch")
        self.checks.sync(self._regs.values())

    async def close(self) -> None:
        await self.checks.close()
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _follow(self, revision: int) -> None:
        async for events in self.store.watch("", revision):
            self._apply(events)

    def _apply(self, events: Iterable[Event]) -> None:
        last = None
        for event in events:
            if event.type == "put":
                self._apply_put(event.kv.key, event.kv.value)
            else:
                self._apply_delete(event.kv.key)
            last = event.revision
        if last is not None:
            self._publish(last)
            self.checks.sync(self._regs.values())

    def _apply_put(self, key: str, value: bytes) -> None:
        try:
            data = json.loads(value)
            if key.startswith(SERVICES):
                self._regs[key] = Registration.model_validate(data)
            elif key.startswith(HEALTH):
                status = data.get("status", "critical")
                if status not in ("passing", "warning", "critical"):
                    status = "critical"
                self._health[key[len(HEALTH) :]] = (status, str(data.get("output", "")))
        except (ValueError, TypeError) as exc:  # another writer stored something we cannot read
            log.warning("registry: ignoring unreadable %s: %s", key, exc)

    def _apply_delete(self, key: str) -> None:
        if key.startswith(SERVICES):
            self._regs.pop(key, None)
        elif key.startswith(HEALTH):
            self._health.pop(key[len(HEALTH) :], None)

    def _publish(self, revision: int) -> None:
        services: dict[str, list[Instance]] = {}
        for reg in self._regs.values():
            services.setdefault(reg.service, []).append(reg.instance(self.health_of(reg)))
        snapshot = Snapshot(
            revision, {name: tuple(sorted(items, key=lambda i: i.id)) for name, items in sorted(services.items())}
        )
        self.catalog.publish(snapshot)
        self._notify()

    def _notify(self) -> None:
        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(wake())

    def health_of_instance(self, service: str, instance_id: str) -> Health | None:
        reg = self._regs.get(f"{SERVICES}{service}/{instance_id}")
        return None if reg is None else self.health_of(reg)

    def health_of(self, reg: Registration) -> Health:
        known = self._health.get(f"{reg.service}/{reg.id}")
        if known is not None:
            return known[0]
        return "passing" if reg.check is None else "critical"

    # -- writes ------------------------------------------------------------------------------

    async def register(self, reg: Registration) -> int:
        """Create or replace an instance (its health state is kept if it had one)."""
        return await self.store.put(reg.key(), reg.model_dump_json().encode())

    async def deregister(self, service: str, instance_id: str) -> bool:
        name = f"{service}/{instance_id}"
        lease = self._leases.pop(name, None)
        if lease is not None:
            try:
                await self.store.revoke(lease)
            except LeaseNotFound:
                pass
        await self.store.delete(f"{HEALTH}{name}")
        return await self.store.delete(f"{SERVICES}{name}") is not None

    async def set_health(self, service: str, instance_id: str, status: Health, output: str = "") -> int:
        body = json.dumps({"status": status, "output": output[:1024]}).encode()
        return await self.store.put(f"{HEALTH}{service}/{instance_id}", body)

    async def heartbeat(self, service: str, instance_id: str, status: Health = "passing", output: str = "") -> None:
        """Renew a TTL check: its health key lives on a lease of ``ttl`` seconds."""
        name = f"{service}/{instance_id}"
        reg = self._regs.get(f"{SERVICES}{name}")
        if reg is None:
            raise KeyError(name)
        if reg.check is None or reg.check.ttl is None:
            raise ValueError(f"instance {name} has no ttl check")
        lease = self._leases.get(name)
        if lease is not None and self._health.get(name, ("", ""))[0] == status:
            try:
                await self.store.keepalive(lease)
                return
            except LeaseNotFound:
                pass
        lease = await self.store.grant(reg.check.ttl)
        old, self._leases[name] = self._leases.get(name), lease
        body = json.dumps({"status": status, "output": output[:1024]}).encode()
        await self.store.put(f"{HEALTH}{name}", body, lease=lease)
        if old is not None and old != lease:
            # The key now lives on the new lease; revoking the old one deletes nothing else.
            try:
                await self.store.revoke(old)
            except LeaseNotFound:
                pass

    async def sync_static(self, registrations: Iterable[Registration]) -> None:
        """Make the config-sourced instances exactly ``registrations`` (on start and reload)."""
        wanted = {reg.key(): reg for reg in registrations}
        for key, reg in list(self._regs.items()):
            if reg.source == "config" and key not in wanted:
                await self.deregister(reg.service, reg.id)
        for key, reg in wanted.items():
            if self._regs.get(key) != reg:
                await self.register(reg)

    # -- reads -------------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self.catalog.snapshot

    async def wait_for_change(self, after: int, timeout: float) -> Snapshot:
        """Return once the catalog revision is beyond ``after`` (or at the timeout): the
        blocking query of the watch API."""
        if self.snapshot.revision > after:
            return self.snapshot
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(lambda: self.snapshot.revision > after)
        except TimeoutError:
            pass
        return self.snapshot

    def describe(self, service: str | None = None) -> dict[str, Any]:
        snap = self.snapshot
        names = [service] if service is not None else list(snap.services)
        out: dict[str, Any] = {"revision": snap.revision, "services": {}}
        for name in names:
            out["services"][name] = [
                {
                    "id": i.id,
                    "address": i.address,
                    "ports": dict(i.ports),
                    "tags": list(i.tags),
                    "meta": dict(i.meta),
                    "weight": i.weight,
                    "node": i.node,
                    "version": i.version,
                    "health": i.health,
                    "output": self._health.get(f"{name}/{i.id}", ("", ""))[1],
                }
                for i in snap.instances(name)
            ]
        return out

    def registration(self, service: str, instance_id: str) -> Registration | None:
        return self._regs.get(f"{SERVICES}{service}/{instance_id}")

    def registrations(self) -> Mapping[str, Registration]:
        return self._regs
