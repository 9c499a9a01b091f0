"""The reconciler's records: allocations as they are persisted in the store, the sidecars of an
allocation, and the desired jobs with where they came from. Plain data; `reconciler.py` acts on it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from scheduler.config import JobConfig
from scheduler.model import Allocation, Resources

ALLOCS = "scheduler/allocs/"  # store keys: one allocation each
JOBS = "scheduler/jobs/"  # store keys: jobs added through the API

Desired = Literal["run", "stop"]


@dataclass
class Alloc:
    """One allocation: where an instance of a job version runs, and how it is doing.

    Persisted fields are written to the store on every change of `desired` or `status`; the
    runtime ones (health, timestamps on the monotonic clock) are rebuilt after a restart.
    """

    id: str
    job: str
    version: str
    node: str
    index: int
    cpu: float
    memory: int
    ports: dict[str, int]
    spec: dict[str, Any]  # the JobConfig of this version, as JSON: restarts run what was placed
    eval_id: str = ""
    desired: Desired = "run"
    # pending, starting, running, restarting, failed, stopping, stopped, lost
    status: str = "pending"
    message: str = ""
    address: str = ""
    handle: dict[str, Any] | None = None
    restarts: int = 0
    last_exit: str = ""
    created_at: float = field(default_factory=time.time)
    # runtime only
    health: str | None = field(default=None, repr=False)
    healthy_since: float | None = field(default=None, repr=False)
    unhealthy_since: float | None = field(default=None, repr=False)
    run_started: float | None = field(default=None, repr=False)
    restart_times: list[float] = field(default_factory=list, repr=False)  # within restart.interval
    registered: bool = field(default=False, repr=False)
    kick: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    kick_reason: str = field(default="", repr=False)
    runner: asyncio.Task[None] | None = field(default=None, repr=False)

    _PERSISTED = (
        *("id", "job", "version", "node", "index", "cpu", "memory", "ports", "spec", "eval_id"),
        *("desired", "status", "message", "address", "handle", "restarts", "last_exit", "created_at"),
    )

    def to_json(self) -> bytes:
        return json.dumps({name: getattr(self, name) for name in self._PERSISTED}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Alloc:
        raw = json.loads(data)
        return cls(**{name: raw[name] for name in cls._PERSISTED if name in raw})

    @property
    def config(self) -> JobConfig:
        return JobConfig.model_validate(self.spec)

    def allocation(self) -> Allocation:
        return Allocation(
            self.id, self.job, self.version, self.node, self.index, Resources(self.cpu, self.memory), dict(self.ports)
        )

    def describe(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self._PERSISTED if name != "spec"}
        out["health"] = self.health
        out["limits"] = (self.handle or {}).get("limits")
        return out


@dataclass(frozen=True)
class Sidecar:
    """A local listener of one allocation (`upstreams:`): 127.0.0.1:`local_port` forwards to
    `service`'s `port` through the router, and carries the instance's identity."""

    alloc_id: str
    job: str
    version: str
    node: str
    service: str
    port: str
    protocol: str
    local_port: int
    policies: tuple[str, ...] = ()


@dataclass
class JobEntry:
    config: JobConfig
    source: Literal["config", "api"]


@dataclass
class Unplaced:
    """Instances of a job that fit nowhere, and Nomad-style reasons."""

    count: int
    explanation: str
