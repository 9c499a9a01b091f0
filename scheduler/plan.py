"""The stack: source order -> feasibility checkers -> rankers -> limited selection -> plan.

`place(nodes, allocations, job)` is a pure function (state in, plan out). `place_into(state,
job)` is the same on a caller-owned `ClusterState`, which it updates, so an evaluation that
places several jobs builds the usage once. `check_allocations(nodes, allocations, jobs)` is
the other direction: which existing allocations no longer belong on their node.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from collections.abc import Iterable, Sequence
from typing import Literal

from scheduler.errors import SpecError
from scheduler.feasible import (
    Checker,
    ConstraintChecker,
    DriverChecker,
    PortChecker,
    ResourceChecker,
    StatusChecker,
    constraint_holds,
)
from scheduler.model import Allocation, Constraint, Failure, Job, Misfit, Node, Plan
from scheduler.rank import (
    AffinityRanker,
    AttributeSpreadRanker,
    BalancedRanker,
    FitRanker,
    JobAntiAffinityRanker,
    Ranker,
)
from scheduler.state import ClusterState

Algorithm = Literal["binpack", "spread"]
# Up to this many nodes every feasible node is scored; above, a limited number of candidates.
SMALL_CLUSTER = 64
# Like Nomad's LimitIterator: a candidate scoring below 0 (e.g. already runs this job) is set
# aside, up to this many times, in the hope of a better one; used if nothing better turns up.
MAX_SKIP = 3


def derive_seed(job: Job, eval_id: str = "") -> int:
    """Stable across processes (not `hash()`, which is salted): replaying an evaluation replays the plan."""
    digest = hashlib.sha256(f"{job.name}\0{job.version}\0{eval_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def candidate_limit(node_count: int, job: Job) -> int | None:
    """How many feasible nodes to score per instance; None = all.

    Small clusters, affinities and attribute spread look at everything (as Nomad does for
    affinities/spreads): a sample would miss the one node running `db`.
    """
    if node_count <= SMALL_CLUSTER or job.affinity or job.spread is not None:
        return None
    return max(2, math.ceil(2 * math.log2(node_count)))


class Stack:
    """Selects one node per instance for `job`; the order of the pieces below is the design.

    Source order: a seeded shuffle, with nodes already in use first for bin-packing, fullest
    first (empty nodes first for spread), so that a limited sample still fills partly used
    nodes before opening new ones; nodes this job landed on earlier in the plan are tried
    first. Checkers, cheapest first:
      1. StatusChecker     node ready (not draining/down)           static
      2. DriverChecker     job's driver on the node                 static
      3. ConstraintChecker attribute constraints                    static
      4. ResourceChecker   cpu, memory left after allocations       dynamic
      5. PortChecker       enough free ports in the dynamic range   dynamic
    Rankers, a weighted average over those that give a score:
      FitRanker (binpack | spread), BalancedRanker (binpack, weight 0.5), JobAntiAffinityRanker
      (same job and version only), AttributeSpreadRanker (if any);
    plus, added to that average, AffinityRanker (if any).
    Affinity rule: a node running the jobs named by `near` gets (net matched weight / 100) *
    AFFINITY_SCALE (3.4) added to its average. The average lies in -2/3..1, so two nodes'
    averages differ by less than 5/3; a net weight of +-50 or more (+-1.7) therefore decides:
    `near: db, weight: 50` lands on db's node whenever that node is feasible, whatever the
    algorithm, fit, anti-affinity or attribute spread say, and weight -50..-100 keeps away
    from it whenever another node is feasible. Smaller weights trade off linearly: weight 10
    (+0.34) only decides between nodes the other rankers score within 0.34 of each other.
    A node rejected once stays rejected for the rest of this job (usage only grows within a
    plan), so each node is checked statically once and skipped cheaply afterwards.
    """

    def __init__(self, state: ClusterState, job: Job, algorithm: Algorithm, rng: random.Random) -> None:
        if algorithm not in ("binpack", "spread"):
            raise SpecError(f"algorithm: expected binpack or spread, got {algorithm!r}")
        self.state = state
        self.job = job
        n = len(state.nodes)
        used = [i for i in range(n) if state.in_use(i)]
        used_set = set(used)
        empty = [i for i in range(n) if i not in used_set]
        rng.shuffle(used)
        rng.shuffle(empty)
        if algorithm == "binpack":
            # Fullest first (stable sort: the shuffle breaks ties), so the sample sees the nodes
            # with small gaps that small instances can close. Measured in bench/sched.py against
            # the plain shuffle: ~0.3 points fewer nodes over the bound and ~15% faster (full
            # nodes are rejected once, at the front, and skipped by `start` afterwards).
            used.sort(key=state.fullness, reverse=True)
        self.order = used + empty if algorithm == "binpack" else empty + used
        self.start = 0
        self.touched: list[int] = []
        self.is_touched = bytearray(n)
        self.dead = bytearray(n)
        self.static_ok = bytearray(n)
        self.static_checkers: list[Checker] = [
            StatusChecker(state, job),
            DriverChecker(state, job),
            ConstraintChecker(state, job),
        ]
        self.dynamic_checkers: list[Checker] = [ResourceChecker(state, job), PortChecker(state, job)]
        self.rankers: list[Ranker] = [FitRanker(state, job, spread=algorithm == "spread")]
        if algorithm == "binpack":
            self.rankers.append(BalancedRanker(state, job))
        self.rankers.append(JobAntiAffinityRanker(state, job))
        if job.spread is not None:
            self.rankers.append(AttributeSpreadRanker(state, job, job.spread.attribute))
        # Added to the average rather than averaged in (the affinity rule above).
        self.bonus: list[Ranker] = [AffinityRanker(state, job)] if job.affinity else []
        self.limit = candidate_limit(n, job)
        self.reasons: dict[str, int] = {}

    def _reject(self, i: int) -> str | None:
        if not self.static_ok[i]:
            for checker in self.static_checkers:
                reason = checker.check(i)
                if reason is not None:
                    return reason
            self.static_ok[i] = 1
        for checker in self.dynamic_checkers:
            reason = checker.check(i)
            if reason is not None:
                return reason
        return None

    def _score(self, i: int) -> float:
        total = 0.0
        given = 0.0
        for ranker in self.rankers:
            score = ranker.score(i)
            if score is not None:
                total += score * ranker.weight
                given += ranker.weight
        average = total / given if given else 0.0
        for ranker in self.bonus:
            score = ranker.score(i)
            if score is not None:
                average += score * ranker.weight
        return average

    def select(self) -> int | None:
        """The best node among the candidates for the next instance, or None if none is feasible."""
        order, dead, limit = self.order, self.dead, self.limit
        start = self.start
        while start < len(order) and dead[order[start]]:
            start += 1
        self.start = start
        best, best_score, seen = -1, -math.inf, 0
        skipped: list[tuple[float, int]] = []
        exhausted = True
        # Nodes this job already landed on come first: the source order was fixed when the
        # stack was built, when they may still have been empty and far down the order.
        is_touched = self.is_touched
        rest = (i for i in itertools.islice(order, start, None) if not is_touched[i])
        for i in itertools.chain(self.touched, rest):
            if dead[i]:
                continue
            reason = self._reject(i)
            if reason is not None:
                dead[i] = 1
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
                continue
            score = self._score(i)
            if limit is not None and score < 0 and len(skipped) < MAX_SKIP:
                skipped.append((score, i))
                continue
            if score > best_score:
                best, best_score = i, score
            seen += 1
            if limit is not None and seen >= limit:
                exhausted = False
                break
        if exhausted:
            for score, i in skipped:
                if score > best_score:
                    best, best_score = i, score
        return best if best >= 0 else None

    def placed(self, i: int) -> None:
        if not self.is_touched[i]:
            self.is_touched[i] = 1
            self.touched.append(i)
        for ranker in self.rankers:
            ranker.placed(i)
        for ranker in self.bonus:
            ranker.placed(i)


def place_into(
    state: ClusterState,
    job: Job,
    *,
    algorithm: Algorithm = "binpack",
    eval_id: str = "",
    seed: int | None = None,
) -> Plan:
    """Place the job's missing instances (indices 0..count-1 not allocated for this version) into `state`."""
    rng = random.Random(derive_seed(job, eval_id) if seed is None else seed)
    plan = Plan()
    missing = [k for k in range(job.count) if (job.name, job.version, k) not in state.allocated]
    if not missing:
        return plan
    stack = Stack(state, job, algorithm, rng)
    for pos, index in enumerate(missing):
        i = stack.select()
        if i is None:
            # Nothing changed since, so every remaining instance fails the same way (Nomad
            # coalesces these); every node was checked, so the counts cover the cluster.
            reasons = dict(stack.reasons)
            plan.failures.extend(Failure(job.name, k, reasons) for k in missing[pos:])
            break
        node = state.nodes[i]
        ports = dict(zip(job.ports, state.pick_ports(i, len(job.ports)), strict=True))
        alloc = Allocation(
            id=f"{job.name}-{index}-{rng.getrandbits(48):012x}",
            job=job.name,
            version=job.version,
            node=node.name,
            index=index,
            resources=job.resources,
            ports=ports,
        )
        state.commit(alloc)
        stack.placed(i)
        plan.placements.append(alloc)
    return plan


def place(
    nodes: Sequence[Node],
    allocations: Iterable[Allocation],
    job: Job,
    *,
    algorithm: Algorithm = "binpack",
    eval_id: str = "",
    seed: int | None = None,
) -> Plan:
    """Pure: a plan placing `job` on `nodes` given existing `allocations`; inputs are not changed.

    The seed defaults to one derived from job name, version and `eval_id`, so the same
    evaluation gives the same plan.
    """
    return place_into(ClusterState(nodes, allocations), job, algorithm=algorithm, eval_id=eval_id, seed=seed)


# As in ResourceChecker: 0.1 + 0.2 cores fit in 0.3.
_CPU_EPSILON = 1e-9


def check_allocations(nodes: Iterable[Node], allocations: Iterable[Allocation], jobs: Iterable[Job]) -> list[Misfit]:
    """Pure: the allocations that no longer belong where they are, in input order, each with
    the first reason that applies:

    1. `job web is gone`: no job of that name in `jobs` (removed).
    2. `node b is gone` / `node b is down` / `node b is draining`.
    3. Only for allocations of the job's current version (others are left to the rolling
       update, which replaces them anyway; they still count towards their node's usage):
       `driver docker unavailable on node b`, then the job's constraints in order:
       `constraint premise = onprem no longer holds on node b`.
    4. `node b over capacity: memory` (or `cpu`, `cpu, memory`: the dimensions over before
       any eviction) when the allocations left on a node after 1-3 exceed its (shrunk)
       capacity. Evicted, among that node's current-version allocations, are as few as
       needed: while over, an allocation that alone brings the node back within capacity
       (the smallest such), else the one relieving most of the excess. On ties the highest
       index goes (then the later in `allocations`), so the oldest instances stay. If the
       excess is owed to old versions only, those are left and the node stays over.

    Reasons 1 and 2 apply to every version: such an instance goes whatever its version. The
    reconciler stops misfits and places replacements.
    """
    by_node: dict[str, Node] = {}
    for node in nodes:
        if node.name in by_node:
            raise SpecError(f"node {node.name}: declared twice")
        by_node[node.name] = node
    by_job: dict[str, Job] = {}
    for job in jobs:
        if job.name in by_job:
            raise SpecError(f"job {job.name}: declared twice")
        by_job[job.name] = job
    allocs = list(allocations)
    compiled: dict[str, list[tuple[Constraint, re.Pattern[str] | None]]] = {
        name: [(c, re.compile(c.value) if c.op == "regex" else None) for c in job.constraints]
        for name, job in by_job.items()
    }
    reasons: dict[int, str] = {}
    staying: dict[str, list[int]] = {}  # node name -> positions of allocations still counted there
    for k, alloc in enumerate(allocs):
        owner = by_job.get(alloc.job)
        where = by_node.get(alloc.node)
        reason: str | None = None
        if owner is None:
            reason = f"job {alloc.job} is gone"
        elif where is None:
            reason = f"node {alloc.node} is gone"
        elif where.status != "ready":
            reason = f"node {where.name} is {where.status}"
        elif alloc.version == owner.version:
            if owner.driver not in where.drivers:
                reason = f"driver {owner.driver} unavailable on node {where.name}"
            else:
                for constraint, pattern in compiled[owner.name]:
                    if not constraint_holds(constraint, where.attributes, pattern):
                        reason = f"constraint {constraint.label} no longer holds on node {where.name}"
                        break
        if reason is not None:
            reasons[k] = reason
        else:
            staying.setdefault(alloc.node, []).append(k)
    for name, positions in staying.items():
        reason, evicted = _over_capacity(by_node[name], allocs, positions, by_job)
        for k in evicted:
            reasons[k] = reason
    return [Misfit(allocs[k], reasons[k]) for k in sorted(reasons)]


def _over_capacity(
    node: Node, allocs: list[Allocation], positions: list[int], jobs: dict[str, Job]
) -> tuple[str, list[int]]:
    """The reason and the positions to evict so that the allocations at `positions` fit `node`."""
    over_cpu = sum(allocs[k].resources.cpu for k in positions) - node.capacity.cpu
    over_mem = sum(allocs[k].resources.memory for k in positions) - node.capacity.memory
    if over_cpu <= _CPU_EPSILON and over_mem <= 0:
        return "", []
    dims = [dim for dim, over in (("cpu", over_cpu > _CPU_EPSILON), ("memory", over_mem > 0)) if over]
    reason = f"node {node.name} over capacity: {', '.join(dims)}"
    total_cpu = sum(allocs[k].resources.cpu for k in positions) or 1.0
    total_mem = sum(allocs[k].resources.memory for k in positions) or 1
    candidates = [k for k in positions if allocs[k].version == jobs[allocs[k].job].version]
    evicted: list[int] = []

    def size(k: int) -> tuple[float, int, int]:  # smallest first; ties: newest first
        r = allocs[k].resources
        return (r.cpu / total_cpu + r.memory / total_mem, -allocs[k].index, -k)

    def relief(k: int) -> tuple[float, int, int]:  # most relief first; ties: newest first
        r = allocs[k].resources
        share = min(r.cpu, over_cpu) / over_cpu if over_cpu > _CPU_EPSILON else 0.0
        share += min(r.memory, over_mem) / over_mem if over_mem > 0 else 0.0
        return (share, allocs[k].index, k)

    while candidates and (over_cpu > _CPU_EPSILON or over_mem > 0):
        covering = [
            k
            for k in candidates
            if allocs[k].resources.cpu >= over_cpu - _CPU_EPSILON and allocs[k].resources.memory >= over_mem
        ]
        if covering:
            pick = min(covering, key=size)
        else:
            pick = max(candidates, key=relief)
            if relief(pick)[0] <= 0:
                break  # what is left is owed to allocations that may not be evicted
        candidates.remove(pick)
        evicted.append(pick)
        over_cpu -= allocs[pick].resources.cpu
        over_mem -= allocs[pick].resources.memory
    return reason, evicted


def placement_order(jobs: Sequence[Job], wanted: str | None = None) -> list[Job]:
    """Jobs an affinity is `near` go before the jobs naming them (else declaration order); with
    `wanted`, only that job and what it is near (transitively)."""
    by_name = {job.name: job for job in jobs}
    order: list[Job] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done; a cycle falls back to declaration order

    def visit(job: Job) -> None:
        if state.get(job.name):
            return
        state[job.name] = 1
        for affinity in job.affinity:
            target = by_name.get(affinity.near)
            if target is not None and affinity.weight > 0:
                visit(target)
        state[job.name] = 2
        order.append(job)

    for job in jobs if wanted is None else [by_name[wanted]]:
        visit(job)
    return order
