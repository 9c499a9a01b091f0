"""Placement through the harness: nodes + allocations + job in, plan out (table-driven)."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from scheduler.errors import SpecError
from scheduler.model import Affinity, Allocation, Constraint, Job, Node, Spread
from scheduler.plan import Algorithm, Stack, check_allocations, place_into
from scheduler.rank import AFFINITY_SCALE, AVERAGE_SPAN
from scheduler.state import ClusterState
from tests.scheduler.harness import job, misfits, node, run, running


@dataclass
class Case:
    id: str
    nodes: list[Node]
    job: Job
    allocations: tuple[Allocation, ...] = ()
    kw: dict[str, Any] = field(default_factory=dict)
    per_node: dict[str, int] | None = None  # exact instances per node
    placed: int | None = None
    reasons: dict[str, int] | None = None  # of the first failure
    explain: tuple[str, ...] = ()  # substrings of plan.explain()


CASES = [
    Case(
        "resources exhausted (explained)",
        [node("a", cpu=4, memory="2Gi"), node("b", cpu=4, memory="2Gi"), node("c", cpu=1, memory="8Gi")],
        job(cpu=2, memory="4Gi"),
        placed=0,
        reasons={"memory exhausted": 2, "cpu exhausted": 1},
        explain=("Placed 0 of 1", "Resources exhausted on 3 nodes: memory (2), cpu (1)"),
    ),
    Case(
        "existing allocations count against capacity",
        [node("a", cpu=2), node("b", cpu=2)],
        job(cpu=2),
        allocations=(running("other", "a", cpu=1),),
        per_node={"b": 1},
    ),
    Case(
        "constraint filters (explained with counts)",
        [node(f"c{i}", premise="cloud") for i in range(7)] + [node("p", premise="onprem", memory="512Mi")],
        job(constraints=(Constraint("premise", "=", "onprem"),)),
        placed=0,
        reasons={"constraint premise = onprem": 7, "memory exhausted": 1},
        explain=('Constraint "premise = onprem" filtered 7 nodes; Resources exhausted on 1 node: memory',),
    ),
    Case(
        "constraint != / in / not_in / regex / exists",
        [
            node("a", zone="z1", os="linux", rack="r12", gpu="1"),
            node("b", zone="z2", os="linux", rack="r12", gpu="1"),
            node("c", zone="z1", os="windows", rack="r12", gpu="1"),
            node("d", zone="z1", os="linux", rack="x9", gpu="1"),
            node("e", zone="z1", os="linux", rack="r12"),
            node("f", zone="z3", os="linux", rack="r12", gpu="1"),
        ],
        job(
            constraints=(
                Constraint("zone", "in", "z1, z3"),
                Constraint("zone", "not_in", "z3"),
                Constraint("os", "!=", "windows"),
                Constraint("rack", "regex", r"^r\d+$"),
                Constraint("gpu", "exists"),
            )
        ),
        per_node={"a": 1},
    ),
    Case(
        "driver unavailable",
        [node("a"), node("b", drivers={"process", "docker"})],
        job(count=2, cpu=3, driver="docker"),
        per_node={"b": 1},
        placed=1,
        reasons={"driver docker unavailable": 1, "cpu exhausted": 1},
        explain=('Driver "docker" unavailable on 1 node', "Resources exhausted on 1 node: cpu"),
    ),
    Case(
        "draining and down nodes are skipped",
        [node("a", status="draining"), node("b", status="down"), node("c")],
        job(count=5, cpu=1),
        per_node={"c": 4},
        reasons={"node draining": 1, "node down": 1, "cpu exhausted": 1},
        explain=("Placed 4 of 5", "web: 1 failed (index 4)", 'Node status "down" filtered 1 node'),
    ),
    Case(
        "bin-pack prefers the fuller node",
        [node("a", cpu=4), node("b", cpu=4), node("c", cpu=4)],
        job(cpu=1),
        allocations=(running("other", "b", cpu=2),),
        per_node={"b": 1},
    ),
    Case(
        "bin-pack: a job's own instances stack when the other nodes are emptier",
        [node("a", cpu=8, memory="8Gi"), node("b", cpu=8, memory="8Gi")],
        job(count=3, cpu=2, memory="2Gi"),
        allocations=(running("other", "a", cpu=2, memory="2Gi"),),
        per_node={"a": 2, "b": 1},
    ),
    Case(
        "spread mode spreads",
        [node("a", cpu=4), node("b", cpu=4), node("c", cpu=4)],
        job(count=3, cpu=1),
        allocations=(running("other", "b", cpu=1),),
        kw={"algorithm": "spread"},
        per_node={"a": 1, "b": 1, "c": 1},
    ),
    Case(
        "job anti-affinity: a job's own instances go to different nodes when packing is equal",
        [node("a", cpu=8), node("b", cpu=8), node("c", cpu=8)],
        job(count=3, cpu=1),
        per_node={"a": 1, "b": 1, "c": 1},
    ),
    Case(
        "near db lands on db's node",
        [node("a", cpu=8), node("b", cpu=8), node("c", cpu=8)],
        job(affinity=(Affinity("db", 100),)),
        allocations=(running("db", "b"), running("cache", "a", cpu=4)),
        per_node={"b": 1},
    ),
    Case(
        "negative affinity keeps apart",
        [node("a", cpu=8), node("b", cpu=8), node("c", cpu=8)],
        job(count=2, affinity=(Affinity("db", -100),)),
        allocations=(running("db", "a", cpu=6),),
        per_node={"b": 1, "c": 1},
    ),
    Case(
        "unsatisfiable job: specific explanation, no placements",
        [node("a", zone="z1"), node("b", zone="z2", status="down")],
        job(count=3, constraints=(Constraint("zone", "=", "z9"),)),
        placed=0,
        reasons={"constraint zone = z9": 1, "node down": 1},
        explain=("Placed 0 of 3", "web: 3 failed (index 0, 1, 2)", 'Constraint "zone = z9" filtered 1 node'),
    ),
    Case(
        "partial placement reports how many failed",
        [node("a", cpu=2), node("b", cpu=1)],
        job(count=5, cpu=1),
        placed=3,
        reasons={"cpu exhausted": 2},
        explain=("Placed 3 of 5", "web: 2 failed (index 3, 4): Resources exhausted on 2 nodes: cpu"),
    ),
    Case(
        "indices already allocated for this version are not placed again",
        [node("a", cpu=8)],
        job(count=3),
        allocations=(running("web", "a", index=1),),
        placed=2,
    ),
    Case(
        "ports exhausted",
        [node("a", reserved_ports=set(range(20000, 32001)))],
        job(ports=("http",)),
        placed=0,
        reasons={"ports exhausted": 1},
        explain=("Resources exhausted on 1 node: ports",),
    ),
    Case("no nodes", [], job(), placed=0, reasons={}, explain=("No nodes in the cluster",)),
    # Job anti-affinity counts the version being placed only.
    Case(
        "rolling update: the old version's instances do not push the new ones away",
        [node("a", cpu=8), node("b", cpu=8), node("c", cpu=8), node("d", cpu=8)],
        job(count=3, version="2"),
        allocations=(running("web", "a", 0), running("web", "b", 1), running("web", "c", 2)),
        per_node={"a": 1, "b": 1, "c": 1},  # counting v1 too would open the empty node d
    ),
    Case(
        "rolling update: the new version's own instances still spread",
        [node("a", cpu=8), node("b", cpu=8), node("c", cpu=8), node("d", cpu=8)],
        job(count=3, version="2"),
        allocations=(
            running("web", "a", 0),
            running("web", "b", 1),
            running("web", "c", 2),
            running("web", "a", 0, version="2"),
        ),
        per_node={"b": 1, "c": 1},
    ),
    # Affinity (rule in Stack's docstring): |weight| >= 50 decides, weight 10 only breaks ties.
    Case(
        "near db 50, binpack: db's emptier node beats a much fuller one",
        [node("a", cpu=16, memory="16Gi"), node("b", cpu=16, memory="16Gi")],
        job(affinity=(Affinity("db", 50),)),
        allocations=(running("db", "a"), running("other", "b", cpu=14, memory="14Gi")),
        per_node={"a": 1},
    ),
    Case(
        "near db 50, spread: db's fuller node beats empty ones",
        [node("a", cpu=16, memory="16Gi"), node("b", cpu=16, memory="16Gi"), node("c", cpu=16, memory="16Gi")],
        job(affinity=(Affinity("db", 50),)),
        allocations=(running("db", "a", cpu=14, memory="14Gi"),),
        kw={"algorithm": "spread"},
        per_node={"a": 1},
    ),
    Case(
        "near db 50, binpack + attribute spread: beats a fuller node in the emptier zone",
        [node(name, cpu=16, memory="16Gi", zone=zone) for name, zone in (("a", "z1"), ("b", "z2"), ("c", "z1"))],
        job(count=2, spread=Spread("zone"), affinity=(Affinity("db", 50),)),
        allocations=(running("db", "a"), running("other", "b", cpu=14, memory="14Gi"), running("web", "c", 0)),
        per_node={"a": 1},
    ),
    Case(
        "near db 50, spread + attribute spread + anti-affinity: all three lose to the affinity",
        [node("a", cpu=16, memory="16Gi", zone="z1"), node("b", cpu=16, memory="16Gi", zone="z2")],
        job(count=2, spread=Spread("zone"), affinity=(Affinity("db", 50),)),
        allocations=(running("db", "a", cpu=12, memory="12Gi"), running("web", "a", 0)),
        kw={"algorithm": "spread"},
        per_node={"a": 1},
    ),
    Case(
        "near db 50, a full db node is not feasible: placed elsewhere",
        [node("a", cpu=4), node("b", cpu=4)],
        job(affinity=(Affinity("db", 100),)),
        allocations=(running("db", "a", cpu=4),),
        per_node={"b": 1},
    ),
    Case(
        "near db -100, spread: keeps away from db's emptier node",
        [node("a", cpu=16, memory="16Gi"), node("b", cpu=16, memory="16Gi")],
        job(affinity=(Affinity("db", -100),)),
        allocations=(running("db", "a"), running("other", "b", cpu=12, memory="12Gi")),
        kw={"algorithm": "spread"},
        per_node={"b": 1},
    ),
    Case(
        "near db -100, binpack: keeps away from db's fuller node",
        [node("a", cpu=16, memory="16Gi"), node("b", cpu=16, memory="16Gi")],
        job(affinity=(Affinity("db", -100),)),
        allocations=(running("db", "a", cpu=12, memory="12Gi"),),
        per_node={"b": 1},
    ),
    Case(
        "near db 10, binpack: loses to a much fuller node",
        [node("a", cpu=16, memory="16Gi"), node("b", cpu=16, memory="16Gi")],
        job(affinity=(Affinity("db", 10),)),
        allocations=(running("db", "a"), running("other", "b", cpu=14, memory="14Gi")),
        per_node={"b": 1},
    ),
    Case(
        "near db 10, spread: loses to a much emptier node",
        [node("a", cpu=16, memory="16Gi"), node("b", cpu=16, memory="16Gi")],
        job(affinity=(Affinity("db", 10),)),
        allocations=(running("db", "a", cpu=14, memory="14Gi"),),
        kw={"algorithm": "spread"},
        per_node={"b": 1},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_placement(case: Case) -> None:
    out = run(case.nodes, case.job, case.allocations, **case.kw)
    if case.per_node is not None:
        assert dict(out.per_node) == case.per_node
    if case.placed is not None:
        assert out.placed == case.placed
        assert out.placed + out.failed == case.job.count - sum(1 for a in case.allocations if a.job == case.job.name)
    if case.reasons is not None:
        assert out.plan.failures, "expected a failure"
        assert out.plan.failures[0].reasons == case.reasons
    text = out.plan.explain()
    for fragment in case.explain:
        assert fragment in text, text


def test_ports_distinct_on_a_node_and_deterministic() -> None:
    nodes = [node("a", cpu=2, reserved_ports={20000, 20002}), node("b", cpu=2)]
    out = run(nodes, job(count=4, ports=("http", "admin")))
    by_node: dict[str, list[int]] = {}
    for alloc in out.plan.placements:
        assert set(alloc.ports) == {"http", "admin"}
        by_node.setdefault(alloc.node, []).extend(alloc.ports.values())
    assert sorted(by_node["a"]) == [20001, 20003, 20004, 20005]  # reserved ports skipped
    assert sorted(by_node["b"]) == [20000, 20001, 20002, 20003]  # the same numbers on another node are fine


def test_ports_taken_by_existing_allocations_are_skipped() -> None:
    out = run([node("a")], job(ports=("http",)), (running("db", "a", http=20000),))
    assert out.plan.placements[0].ports == {"http": 20001}


def test_attribute_spread_balances_zones() -> None:
    nodes = [node(f"{z}{i}", cpu=16, zone=z) for z in ("z1", "z2", "z3") for i in range(3)]
    allocations = (running("web", "z10", index=100), running("web", "z10", index=101))
    out = run(nodes, job(count=7, spread=Spread("zone")), allocations)
    zones = Counter(a.node[:2] for a in out.plan.placements) + Counter({"z1": 2})
    assert sorted(zones.values()) == [3, 3, 3]


def test_attribute_spread_penalises_nodes_without_the_attribute() -> None:
    out = run([node("bare", cpu=16), node("a", cpu=1, zone="z1")], job(spread=Spread("zone")))
    assert dict(out.per_node) == {"a": 1}


def test_same_seed_same_plan_and_eval_id_changes_the_seed() -> None:
    nodes = [node(f"n{i}", cpu=64, memory="64Gi") for i in range(200)]
    spec = job(count=20, ports=("http",))
    first = run(nodes, spec, eval_id="e1").plan
    again = run(nodes, spec, eval_id="e1").plan
    assert first == again
    others = [run(nodes, spec, eval_id=f"e{k}").plan for k in range(2, 6)]
    assert any([a.node for a in p.placements] != [a.node for a in first.placements] for p in others)
    assert run(nodes, spec, seed=7).plan == run(nodes, spec, seed=7).plan


def test_bin_pack_fills_one_node_before_the_next_across_jobs() -> None:
    """One evaluation placing 40 one-instance jobs into a shared state (place_into)."""
    for count in (5, 300):  # all nodes scored, and a limited sample (> SMALL_CLUSTER)
        state = ClusterState([node(f"n{i:03d}", cpu=4, memory="16Gi") for i in range(count)])
        for k in range(40 if count > 10 else 20):
            plan = place_into(state, job(f"j{k}", cpu=1))
            assert len(plan.placements) == 1
        used = Counter(a.node for a in state.allocations)
        assert sorted(used.values()) == [4] * len(used)  # every opened node is full


def test_inputs_are_not_changed() -> None:
    nodes = [node("a")]
    allocations = (running("db", "a"),)
    run(nodes, job(count=2), allocations)
    assert allocations[0].resources.cpu == 1 and nodes[0].capacity.cpu == 4


def test_bad_input_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="declared twice"):
        run([node("a"), node("a")], job())
    with pytest.raises(SpecError, match="algorithm"):
        run([node("a")], job(), algorithm="random")


def test_place_into_commits_to_the_shared_state() -> None:
    state = ClusterState([node("a", cpu=2)])
    assert len(place_into(state, job("one", cpu=2)).placements) == 1
    plan = place_into(state, job("two", cpu=1))
    assert plan.failures[0].reasons == {"cpu exhausted": 1}
    assert place_into(state, job("one", cpu=2)).placements == []  # index 0 of v1 already placed


@pytest.mark.parametrize("algorithm", ["binpack", "spread"])
def test_small_affinity_breaks_ties_whatever_the_seed(algorithm: str) -> None:
    """a and b are equally used; without the affinity the seeded order picks either."""
    nodes = [node("a", cpu=8), node("b", cpu=8)]
    allocations = (running("db", "a"), running("other", "b"))
    plain = {next(iter(run(nodes, job(), allocations, algorithm=algorithm, seed=k).per_node)) for k in range(20)}
    assert plain == {"a", "b"}
    for k in range(20):
        out = run(nodes, job(affinity=(Affinity("db", 10),)), allocations, algorithm=algorithm, seed=k)
        assert dict(out.per_node) == {"a": 1}


@pytest.mark.parametrize("algorithm", ["binpack", "spread"])
def test_averaged_rankers_stay_within_the_span_an_affinity_of_50_outweighs(algorithm: Algorithm) -> None:
    """The affinity rule's premise, on random clusters: the averaged scores of any two feasible
    nodes differ by less than AVERAGE_SPAN, and weight 50 adds more than that."""
    assert 0.5 * AFFINITY_SCALE > AVERAGE_SPAN > 0.1 * AFFINITY_SCALE
    rnd = random.Random(5)
    low, high = math.inf, -math.inf
    for _ in range(200):
        nodes = [node(f"n{k}", cpu=rnd.choice([1, 4, 16]), zone=rnd.choice("xyz")) for k in range(8)]
        allocations = tuple(
            running(rnd.choice(["web", "db"]), f"n{k}", index=j, cpu=rnd.choice([0, 0.5]), memory="512Mi")
            for j, k in enumerate(rnd.sample(range(8), 5))
        )
        stack = Stack(ClusterState(nodes, allocations), job(count=3, spread=Spread("zone")), algorithm, rnd)
        for i in range(len(nodes)):
            if stack._reject(i) is None:
                score = stack._score(i)
                low, high = min(low, score), max(high, score)
    assert high - low < AVERAGE_SPAN
    assert high - low > 1.0  # the random clusters do reach far apart


def test_anti_affinity_counts_per_job_and_version_in_the_state() -> None:
    state = ClusterState(
        [node("a"), node("b")],
        (running("web", "a", 0), running("web", "a", 1), running("web", "b", 0, version="2")),
    )
    assert state.version_nodes == {("web", "1"): {0: 2}, ("web", "2"): {1: 1}}
    assert state.job_nodes == {"web": {0: 2, 1: 1}}
    place_into(state, job(count=2, version="2"))
    assert sum(state.version_nodes[("web", "2")].values()) == 2


# --- check_allocations: existing allocations that no longer belong where they are ---------


@dataclass
class MisfitCase:
    id: str
    nodes: list[Node]
    allocations: tuple[Allocation, ...]
    jobs: list[Job]
    misfits: dict[str, str]  # allocation id -> reason; every other allocation stays


WEB = job("web", count=3)
DB = job("db", cpu=1, memory="2Gi")
ONPREM = (Constraint("premise", "=", "onprem"),)

MISFIT_CASES = [
    MisfitCase(
        "everything still fits",
        [node("a", premise="onprem"), node("b", premise="onprem")],
        (running("web", "a", 0), running("web", "b", 1), running("db", "a")),
        [job("web", count=2, constraints=ONPREM), DB],
        {},
    ),
    MisfitCase(
        "node gone, down, draining",
        [node("b", status="down"), node("c", status="draining"), node("d")],
        (running("web", "x", 0), running("web", "b", 1), running("web", "c", 2), running("db", "d")),
        [WEB, DB],
        {"web-0-old": "node x is gone", "web-1-old": "node b is down", "web-2-old": "node c is draining"},
    ),
    MisfitCase(
        "job removed",
        [node("a")],
        (running("web", "a", 0), running("db", "a")),
        [DB],
        {"web-0-old": "job web is gone"},
    ),
    MisfitCase(
        "driver no longer on the node",
        [node("a", drivers={"process"}), node("b", drivers={"docker"})],
        (running("web", "a", 0), running("web", "b", 1)),
        [job("web", count=2, driver="docker")],
        {"web-0-old": "driver docker unavailable on node a"},
    ),
    MisfitCase(
        "constraint no longer matched by the node's attributes",
        [node("a", premise="cloud", zone="z1"), node("b", premise="onprem"), node("c", premise="onprem", zone="z1")],
        (running("web", "a", 0), running("web", "b", 1), running("web", "c", 2)),
        [job("web", count=3, constraints=(*ONPREM, Constraint("zone", "exists")))],
        {
            "web-0-old": "constraint premise = onprem no longer holds on node a",
            "web-1-old": "constraint zone exists no longer holds on node b",
        },
    ),
    MisfitCase(
        "another version is left to the rolling update; node-level reasons still apply",
        [node("a", premise="cloud"), node("b", status="down", premise="onprem")],
        (running("web", "a", 0), running("web", "b", 1), running("web", "a", 2, version="2")),
        [job("web", count=3, version="2", constraints=ONPREM)],
        {"web-1-old": "node b is down", "web-2-v2": "constraint premise = onprem no longer holds on node a"},
    ),
    MisfitCase(
        "memory shrank: one eviction, the newest of equals",
        [node("a", cpu=8, memory="4Gi")],
        (running("web", "a", 0), running("web", "a", 2), running("web", "a", 1), running("db", "a", memory="2Gi")),
        [WEB, DB],
        {"web-2-old": "node a over capacity: memory"},
    ),
    MisfitCase(
        "memory shrank: the fewest evictions (2Gi + 1Gi, not three of 1Gi)",
        [node("a", cpu=8, memory="4Gi")],
        (running("db", "a", memory="2Gi"), *(running("web", "a", k) for k in range(5))),
        [job("web", count=5), DB],
        {"db-0-old": "node a over capacity: memory", "web-4-old": "node a over capacity: memory"},
    ),
    MisfitCase(
        "a single allocation covering the excess beats several smaller ones",
        [node("a", cpu=2, memory="16Gi")],
        (running("big", "a", cpu=2), running("web", "a", 0), running("web", "a", 1)),
        [WEB, job("big", cpu=2)],
        {"big-0-old": "node a over capacity: cpu"},
    ),
    MisfitCase(
        "the smallest allocation that covers the excess goes",
        [node("a", cpu=3, memory="16Gi")],
        (running("big", "a", cpu=2), running("web", "a", 0), running("web", "a", 1)),
        [WEB, job("big", cpu=2)],
        {"web-1-old": "node a over capacity: cpu"},
    ),
    MisfitCase(
        "cpu and memory both over",
        [node("a", cpu=1, memory="1Gi"), node("b")],
        (running("web", "a", 0), running("web", "a", 1), running("web", "b", 2)),
        [WEB],
        {"web-1-old": "node a over capacity: cpu, memory"},
    ),
    MisfitCase(
        "misfits for other reasons no longer count against capacity",
        [node("a", cpu=1)],
        (running("web", "a", 0), running("gone", "a")),
        [WEB],
        {"gone-0-old": "job gone is gone"},
    ),
    MisfitCase(
        "0.1 + 0.2 cores fit in 0.3",
        [node("a", cpu=0.3)],
        (running("web", "a", 0, cpu=0.1), running("web", "a", 1, cpu=0.2)),
        [WEB],
        {},
    ),
]


@pytest.mark.parametrize("case", MISFIT_CASES, ids=[c.id for c in MISFIT_CASES])
def test_check_allocations(case: MisfitCase) -> None:
    assert misfits(case.nodes, case.allocations, case.jobs) == case.misfits


def test_check_allocations_is_pure_and_in_input_order() -> None:
    nodes = [node("a", status="down"), node("b")]
    allocations = [running("web", "b", 2), running("web", "a", 0), running("web", "x", 1)]
    found = check_allocations(nodes, allocations, [WEB])
    assert [(m.alloc.id, m.reason) for m in found] == [("web-0-old", "node a is down"), ("web-1-old", "node x is gone")]
    assert found[0].alloc is allocations[1]
    assert [a.id for a in allocations] == ["web-2-old", "web-0-old", "web-1-old"] and nodes[0].status == "down"
    with pytest.raises(SpecError, match="job web: declared twice"):
        check_allocations(nodes, allocations, [WEB, WEB])


def test_misfits_are_replaced_elsewhere() -> None:
    """What the reconciler does with them: drop the misfits from the state, place again."""
    nodes = [node("a", premise="cloud"), node("b", premise="onprem")]
    spec = job("web", count=2, constraints=ONPREM)
    allocations = (running("web", "a", 0), running("web", "b", 1))
    found = check_allocations(nodes, allocations, [spec])
    assert [m.alloc.id for m in found] == ["web-0-old"]
    gone = {m.alloc.id for m in found}
    out = run(nodes, spec, tuple(a for a in allocations if a.id not in gone))
    assert [(a.index, a.node) for a in out.plan.placements] == [(0, "b")]
