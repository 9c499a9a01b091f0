"""Following a registry over HTTP: a :class:`Catalog` kept in step with another pointsman's.

:class:`RemoteCatalog` asks the registry's ``GET /v1/services`` once, then in a loop with a
blocking query (``?index=N&wait=30s``: the answer comes when the revision passes N, or after
the wait with nothing new) and publishes every new revision into its catalog, so DNS-free
readers (the router's clusters that follow a service) see the remote registry's instances.

When the registry cannot be reached the last catalog stays published (the router keeps sending
to the instances it knew) and the client retries with a backoff (0.2 s doubling to 5 s). It
logs once when the registry is lost and once when it is back. After a reconnect the first
query does not block: a restarted registry may count its revisions from lower down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from discovery.model import HEALTH_ORDER, Catalog, Instance, Snapshot

log = logging.getLogger("pointsman.remote")

WAIT = 30.0
MIN_BACKOFF = 0.2
MAX_BACKOFF = 5.0


def parse_services(body: Any) -> Snapshot:
    """A ``GET /v1/services`` answer as a snapshot; ValueError when it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("revision"), int):
        raise ValueError("not a registry answer: no revision")
    services = body.get("services")
    if not isinstance(services, dict):
        raise ValueError("not a registry answer: no services")
    out: dict[str, tuple[Instance, ...]] = {}
    for name, items in services.items():
        if not isinstance(items, list):
            raise ValueError(f"service {name!r}: not a list of instances")
        instances = []
        for item in items:
            try:
                health = item.get("health", "passing")
                if health not in HEALTH_ORDER:
                    raise ValueError(f"health {health!r}")
                instances.append(
                    Instance(
                        id=str(item["id"]),
                        service=str(name),
                        address=str(item["address"]),
                        ports={str(k): int(v) for k, v in (item.get("ports") or {}).items()},
                        tags=tuple(str(t) for t in item.get("tags") or ()),
                        meta={str(k): str(v) for k, v in (item.get("meta") or {}).items()},
                        weight=int(item.get("weight", 1)),
                        node=item.get("node"),
                        version=item.get("version"),
                        health=health,
                    )
                )
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"service {name!r}: bad instance: {exc}") from None
        out[str(name)] = tuple(sorted(instances, key=lambda i: i.id))
    return Snapshot(body["revision"], out)


class RemoteCatalog:
    """Publishes a remote registry's services into ``catalog`` until :meth:`stop`."""

    def __init__(self, base_url: str, catalog: Catalog, *, wait: float = WAIT) -> None:
        self.base_url = base_url.rstrip("/")
        self.catalog = catalog
        self.wait = wait
        self.connected = False
        self.synced = asyncio.Event()  # set once the first catalog arrived
        self.last_error = ""
        self.last_contact: float | None = None  # time.time() of the last answer
        self._warned = False
        self._task: asyncio.Task[None] | None = None

    @property
    def revision(self) -> int:
        return self.catalog.snapshot.revision

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"follow {self.base_url}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        backoff = MIN_BACKOFF
        timeout = aiohttp.ClientTimeout(total=self.wait + 10.0, connect=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                try:
                    await self._poll(http)
                    backoff = MIN_BACKOFF
                except asyncio.CancelledError:
                    raise
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    self._lost(str(exc) or type(exc).__name__)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)

    async def _poll(self, http: aiohttp.ClientSession) -> None:
        url = f"{self.base_url}/v1/services"
        if self.connected:
            url += f"?index={self.revision}&wait={self.wait:g}s"
        async with http.get(url) as resp:
            if resp.status != 200:
                raise ValueError(f"{url}: HTTP {resp.status}")
            snapshot = parse_services(await resp.json(content_type=None))
        self.last_contact = time.time()
        reconnected = not self.connected
        if reconnected:
            self.connected = True
            log.info("registry %s connected (revision %d)", self.base_url, snapshot.revision)
        # After a reconnect, whatever the revision: a restarted registry may reuse numbers.
        if reconnected or snapshot.revision != self.revision:
            self.catalog.publish(snapshot)
        self.synced.set()

    def _lost(self, why: str) -> None:
        self.last_error = why
        if self.connected:
            self.connected = False
            log.warning(
                "registry %s lost (%s): serving the last known catalog (revision %d), retrying",
                self.base_url,
                why,
                self.revision,
            )
        elif not self.synced.is_set() and not self._warned:
            self._warned = True
            log.warning("registry %s unreachable (%s): no catalog yet, retrying", self.base_url, why)
