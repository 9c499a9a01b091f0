"""State in, plan out: small builders for nodes and jobs, and a summary of a plan (or of the
misfits among existing allocations) to assert on."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from scheduler.model import Allocation, Job, Node, Plan, Resources
from scheduler.plan import check_allocations, place


def node(name: str, cpu: float = 4, memory: str = "8Gi", **kw: Any) -> Node:
    """node("a", zone="z1", drivers={"docker"}, status="down"): keywords that are not Node fields are attributes."""
    fields = {k: kw.pop(k) for k in ("drivers", "reserved_ports", "status") if k in kw}
    if "drivers" in fields:
        fields["drivers"] = frozenset(fields["drivers"])
    if "reserved_ports" in fields:
        fields["reserved_ports"] = frozenset(fields["reserved_ports"])
    return Node(name, Resources.parse(cpu, memory), attributes={k: str(v) for k, v in kw.items()}, **fields)


def job(name: str = "web", count: int = 1, cpu: float = 1, memory: str = "1Gi", **kw: Any) -> Job:
    return Job(name=name, count=count, resources=Resources.parse(cpu, memory), **kw)


def running(
    job_name: str,
    node_name: str,
    index: int = 0,
    cpu: float = 1,
    memory: str = "1Gi",
    *,
    version: str = "1",
    **ports: int,
) -> Allocation:
    """An existing allocation of another evaluation: id `web-0-old` (`web-0-v2` for version 2)."""
    ident = f"{job_name}-{index}-old" if version == "1" else f"{job_name}-{index}-v{version}"
    return Allocation(ident, job_name, version, node_name, index, Resources.parse(cpu, memory), ports)


@dataclass
class Outcome:
    plan: Plan
    per_node: Counter[str] = field(default_factory=Counter)

    @property
    def placed(self) -> int:
        return len(self.plan.placements)

    @property
    def failed(self) -> int:
        return len(self.plan.failures)


def run(nodes: list[Node], the_job: Job, allocations: tuple[Allocation, ...] = (), **kw: Any) -> Outcome:
    plan = place(nodes, allocations, the_job, **kw)
    return Outcome(plan, Counter(a.node for a in plan.placements))


def misfits(nodes: list[Node], allocations: tuple[Allocation, ...], jobs: list[Job]) -> dict[str, str]:
    """check_allocations as {allocation id: reason} (the list is in input order; ids are unique here)."""
    found = check_allocations(nodes, allocations, jobs)
    return {m.alloc.id: m.reason for m in found}
