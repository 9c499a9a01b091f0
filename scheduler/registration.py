"""What the registry is told about an allocation whose task runs: an instance of its job
(the service) at its address, with the job's named ports (not its sidecars'), its node and
version, the job's health check, and meta naming the allocation. Health, and so DNS and the
router's traffic, follows from the registry's checks."""

from __future__ import annotations

from discovery.registry import Check, Registration
from scheduler.config import JobConfig
from scheduler.records import Alloc


def registration(alloc: Alloc, config: JobConfig) -> Registration:
    check = None
    if config.health is not None:
        h = config.health
        check = Check(
            http=h.http,
            tcp=h.http is None,
            port=h.port,
            interval=h.interval,
            timeout=min(h.timeout, h.interval),
        )
    return Registration(
        id=alloc.id,
        service=alloc.job,
        address=alloc.address or "127.0.0.1",
        ports={name: port for name, port in alloc.ports.items() if name in config.ports},  # not sidecars
        meta=_meta(alloc, config),
        node=alloc.node,
        version=alloc.version,
        check=check,
        source="scheduler",
    )


def _meta(alloc: Alloc, config: JobConfig) -> dict[str, str]:
    """An instance's registry meta; `source_address` where the task's connections come from
    another address than the registered one (a container), for placement identity."""
    meta = {"alloc": alloc.id, "index": str(alloc.index), "driver": config.driver}
    source = (alloc.handle or {}).get("source_address")
    if source:
        meta["source_address"] = str(source)
    return meta
