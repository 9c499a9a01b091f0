"""Active health checks of registered instances (HTTP GET or TCP connect).

One task per checked instance, restarted when its registration changes. A result is written
to the store only when the status (or its output) changes, so a steady fleet costs no writes;
the registry's watch then republishes the catalog. TTL checks have no task: their health key
expires with its lease when heartbeats stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import aiohttp

from discovery.model import Health

if TYPE_CHECKING:
    from discovery.registry import Registration, Registry

log = logging.getLogger("pointsman.discovery.checks")


class CheckRunner:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._tasks: dict[str, tuple[Registration, asyncio.Task[None]]] = {}
        self._session: aiohttp.ClientSession | None = None

    def sync(self, registrations: Iterable[Registration]) -> None:
        """Run exactly one check task per registration with an http or tcp check."""
        wanted = {
            f"{r.service}/{r.id}": r
            for r in registrations
            if r.check is not None and (r.check.http is not None or r.check.tcp)
        }
        for name, (reg, task) in list(self._tasks.items()):
            if wanted.get(name) != reg:
                task.cancel()
                del self._tasks[name]
        loop = asyncio.get_running_loop()
        for name, reg in wanted.items():
            if name not in self._tasks:
                self._tasks[name] = (reg, loop.create_task(self._run(reg), name=f"check:{name}"))

    async def close(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self, reg: Registration) -> None:
        check = reg.check
        assert check is not None
        last: tuple[Health, str] | None = None
        while True:
            status, output = await self._check(reg)
            if (status, output) != last:
                try:
                    await self.registry.set_health(reg.service, reg.id, status, output)
                    last = (status, output)
                except Exception:  # the store is unavailable: try again next round
                    log.exception("check %s/%s: could not record the result", reg.service, reg.id)
            await asyncio.sleep(check.interval)

    def _port(self, reg: Registration) -> int | None:
        check = reg.check
        assert check is not None
        if check.port is not None:
            return reg.ports.get(check.port)
        return next(iter(reg.ports.values()), None)

    async def _check(self, reg: Registration) -> tuple[Health, str]:
        check = reg.check
        assert check is not None
        port = self._port(reg)
        if port is None:
            return "critical", "no port to check"
        host = f"[{reg.address}]" if ":" in reg.address else reg.address
        try:
            async with asyncio.timeout(check.timeout):
                if check.http is not None:
                    if self._session is None:
                        self._session = aiohttp.ClientSession()
                    async with self._session.get(f"http://{host}:{port}{check.http}", allow_redirects=False) as resp:
                        if 200 <= resp.status < 300:
                            return "passing", f"HTTP {resp.status}"
                        if resp.status == 429:
                            return "warning", "HTTP 429"
                        return "critical", f"HTTP {resp.status}"
                _, writer = await asyncio.open_connection(reg.address, port)
                writer.close()
                return "passing", "TCP connect ok"
        except TimeoutError:
            return "critical", f"timed out after {check.timeout}s"
        except (OSError, aiohttp.ClientError) as exc:
            return "critical", str(exc) or type(exc).__name__
