"""Helpers for the discovery tests: catalog snapshots built by hand and real DNS servers on
127.0.0.1:0 (UDP and TCP on the port they got), plus ``dig`` from Debian's bind9-dnsutils."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from discovery.config import DnsConfig
from discovery.dns import DnsServer
from discovery.model import Catalog, Health, Instance, Snapshot
from tests.support import missing


def instance(
    id: str,
    service: str,
    address: str,
    *,
    ports: dict[str, int] | None = None,
    tags: tuple[str, ...] = (),
    meta: dict[str, str] | None = None,
    weight: int = 1,
    health: Health = "passing",
) -> Instance:
    return Instance(
        id=id,
        service=service,
        address=address,
        ports=ports or {},
        tags=tags,
        meta=meta or {},
        weight=weight,
        health=health,
    )


def snapshot(*instances: Instance, revision: int = 1, empty: tuple[str, ...] = ()) -> Snapshot:
    """A snapshot of ``instances`` grouped by service (sorted by id, as the registry does);
    ``empty`` names services registered without instances."""
    services: dict[str, list[Instance]] = {name: [] for name in empty}
    for item in instances:
        services.setdefault(item.service, []).append(item)
    return Snapshot(revision, {name: tuple(sorted(items, key=lambda i: i.id)) for name, items in services.items()})


def dns_config(**overrides: Any) -> DnsConfig:
    """A DnsConfig for tests: an ephemeral port, no upstreams, loopback clients allowed."""
    values: dict[str, Any] = {"listen": "127.0.0.1:0", "upstreams": [], "allow": ["127.0.0.0/8", "::1/128"]}
    values.update(overrides)
    return DnsConfig.model_validate(values)


@asynccontextmanager
async def running_dns(snap: Snapshot | None = None, **overrides: Any) -> AsyncIterator[tuple[DnsServer, Catalog]]:
    """A started DnsServer (config from :func:`dns_config`) serving ``snap``; stopped on exit."""
    catalog = Catalog()
    if snap is not None:
        catalog.publish(snap)
    server = DnsServer(dns_config(**overrides), catalog)
    await server.start()
    try:
        yield server, catalog
    finally:
        await server.stop()


@contextmanager
def threaded_dns(snap: Snapshot, **overrides: Any) -> Iterator[tuple[DnsServer, list[dict[str, Any]]]]:
    """A DnsServer on its own event loop in a thread, for synchronous tests (hypothesis).
    Yields the server and the list of errors its loop's exception handler saw."""
    errors: list[dict[str, Any]] = []
    started = threading.Event()
    state: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        catalog = Catalog()
        catalog.publish(snap)
        server = DnsServer(dns_config(**overrides), catalog)
        state["server"], state["loop"] = server, loop
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:
            state["error"] = exc
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
            loop.run_until_complete(server.stop())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="dns-server", daemon=True)
    thread.start()
    assert started.wait(10), "the DNS server thread did not start"
    if "error" in state:
        raise state["error"]
    try:
        yield state["server"], errors
    finally:
        state["loop"].call_soon_threadsafe(state["loop"].stop)
        thread.join(10)


def require_dig() -> str:
    """dig's path; skip without it on a developer machine, fail under CI=1 (`make test`
    installs it as root through the Makefile's DEBIAN_DEPS)."""
    path = shutil.which("dig")
    if path is None:
        missing("dig is missing (apt-get install bind9-dnsutils)")
    return path


async def dig(server: DnsServer, *args: str) -> str:
    """Run dig against ``server`` (UDP unless ``+tcp`` is among ``args``) and return its output."""
    host, port = server.address
    process = await asyncio.create_subprocess_exec(
        require_dig(),
        f"@{host}",
        "-p",
        str(port),
        "+time=2",
        "+tries=1",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return out.decode()
