"""Feasibility checkers: each answers `check(node) -> reason | None` for one job.

A reason is a short key counted in `Failure.reasons` and grouped by `Failure.explain()`:
`node draining`, `driver docker unavailable`, `constraint premise = onprem`,
`cpu exhausted`, `memory exhausted`, `ports exhausted`.

Static checkers depend only on the node and the job, so the stack runs them once per node
per job; dynamic checkers depend on usage, which grows while a plan is built.

`scheduler.plan.check_allocations` asks the same questions the other way round, of
allocations already placed (with `constraint_holds`).
"""

from __future__ import annotations

import re
from typing import Protocol

from scheduler.model import Constraint, Job
from scheduler.state import ClusterState


class Checker(Protocol):
    def check(self, i: int) -> str | None: ...


class StatusChecker:
    """Only ready nodes take work; draining and down nodes are filtered first (cheapest)."""

    static = True

    def __init__(self, state: ClusterState, job: Job) -> None:
        self.nodes = state.nodes

    def check(self, i: int) -> str | None:
        status = self.nodes[i].status
        return None if status == "ready" else f"node {status}"


class DriverChecker:
    static = True

    def __init__(self, state: ClusterState, job: Job) -> None:
        self.nodes = state.nodes
        self.driver = job.driver
        self.reason = f"driver {job.driver} unavailable"

    def check(self, i: int) -> str | None:
        return None if self.driver in self.nodes[i].drivers else self.reason


def constraint_holds(constraint: Constraint, attributes: dict[str, str], pattern: re.Pattern[str] | None) -> bool:
    value = attributes.get(constraint.attribute)
    op = constraint.op
    if op == "exists":
        return value is not None
    if op == "!=":
        return value != constraint.value
    if op == "not_in":
        return value not in {v.strip() for v in constraint.value.split(",")}
    if value is None:  # =, in, regex need the attribute
        return False
    if op == "=":
        return value == constraint.value
    if op == "in":
        return value in {v.strip() for v in constraint.value.split(",")}
    assert pattern is not None
    return pattern.search(value) is not None


class ConstraintChecker:
    """All of the job's constraints; the first that fails names the reason."""

    static = True

    def __init__(self, state: ClusterState, job: Job) -> None:
        self.nodes = state.nodes
        self.constraints = [
            (c, re.compile(c.value) if c.op == "regex" else None, f"constraint {c.label}") for c in job.constraints
        ]

    def check(self, i: int) -> str | None:
        attributes = self.nodes[i].attributes
        for constraint, pattern, reason in self.constraints:
            if not constraint_holds(constraint, attributes, pattern):
                return reason
        return None


class ResourceChecker:
    """cpu and memory against capacity minus existing allocations and this plan's placements."""

    static = False

    def __init__(self, state: ClusterState, job: Job) -> None:
        self.state = state
        self.cpu = job.resources.cpu
        self.memory = job.resources.memory

    def check(self, i: int) -> str | None:
        s = self.state
        # A small epsilon so that 0.1 + 0.2 cores fit in 0.3.
        if s.cpu_used[i] + self.cpu > s.cpu_cap[i] + 1e-9:
            return "cpu exhausted"
        if s.mem_used[i] + self.memory > s.mem_cap[i]:
            return "memory exhausted"
        return None


class PortChecker:
    """Enough free ports in the node's dynamic range for the job's named ports."""

    static = False

    def __init__(self, state: ClusterState, job: Job) -> None:
        self.free = state.ports_free
        self.needed = len(job.ports)

    def check(self, i: int) -> str | None:
        return None if self.free[i] >= self.needed else "ports exhausted"
