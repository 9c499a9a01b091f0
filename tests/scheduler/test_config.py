"""The scheduler's config section: parsing, conversion to the model, cross-check errors."""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from scheduler.config import (
    JobConfig,
    NodeConfig,
    SchedulerConfig,
    auto_capacity,
    check_declarations,
    effective_nodes,
)
from scheduler.model import Affinity, Constraint, Resources, Spread
from units import parse_duration

ISSUE_EXAMPLE = """
nodes:
  - {name: local, capacity: auto, attributes: {premise: onprem, region: eu, zone: a}}
  - {name: edge-1, capacity: {cpu: 2, memory: 2Gi}, attributes: {premise: cloud, zone: b}, driver_host: local}
jobs:
  - name: db
    command: [postgres, -p, "${PORT_PG}"]
    ports: [pg]
  - name: web
    version: "1"
    driver: process
    command: [python3, -m, http.server, "${PORT_HTTP}", --bind, "${HOST}"]
    count: 3
    resources: {cpu: 0.25, memory: 128Mi}
    ports: [http]
    env: {DATABASE_URL: "postgres://app@${upstream:db}/app"}
    health: {http: /, port: http, interval: 1s, grace: 5s}
    constraints: [{attribute: premise, op: "=", value: onprem}]
    affinity: [{near: db, weight: 50}]
    spread: {attribute: zone}
    restart: {attempts: 5, delay: 1s, max_delay: 30s}
    update: {max_parallel: 1, healthy_for: 3s}
"""


class Section(BaseModel):
    nodes: list[NodeConfig] | None = None
    jobs: list[JobConfig] = []
    scheduler: SchedulerConfig | None = None


def section(data: dict[str, Any]) -> Section:
    return Section.model_validate(data)


def problems(data: dict[str, Any]) -> list[str]:
    s = section(data)
    out = []
    for path, reason in check_declarations(s.nodes, s.jobs):
        text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        out.append(f"{text}: {reason}")
    return out


def job(**fields: Any) -> dict[str, Any]:
    return {"name": "web", "command": ["run"], **fields}


def test_issue_example_parses_and_converts() -> None:
    s = section(yaml.safe_load(ISSUE_EXAMPLE))
    assert check_declarations(s.nodes, s.jobs) == []
    assert s.nodes is not None
    local, edge = (n.to_node() for n in s.nodes)
    assert local.capacity == auto_capacity()
    assert edge.capacity == Resources(2.0, 2 * 1024**3)
    assert edge.attributes == {"premise": "cloud", "zone": "b"}
    assert edge.drivers == frozenset({"process", "docker"})  # the default: every driver, filtered by what runs here
    assert s.nodes[1].driver_host == "local"
    web = s.jobs[1]
    assert web.health is not None and web.health.interval == 1.0 and web.health.grace == 5.0
    assert (web.restart.delay, web.restart.max_delay, web.update.healthy_for) == (1.0, 30.0, 3.0)
    model = web.to_job()
    assert model.name == "web" and model.version == "1" and model.count == 3
    assert model.resources == Resources(0.25, 128 * 1024**2)
    assert model.ports == ("http",)
    assert model.constraints == (Constraint("premise", "=", "onprem"),)
    assert model.affinity == (Affinity("db", 50),)
    assert model.spread == Spread("zone")


def test_auto_capacity_is_this_machine() -> None:
    capacity = auto_capacity()
    assert capacity.cpu == float(os.cpu_count() or 1)
    with open("/proc/meminfo", encoding="ascii") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert capacity.memory == kb * 1024


def test_local_node_is_implicit() -> None:
    nodes = effective_nodes(None)
    assert [n.name for n in nodes] == ["local"]
    assert nodes[0].to_node().capacity == auto_capacity()
    assert effective_nodes([]) == []


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), (3, 3.0)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["2x", "-1s", "", True, [1]])
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_defaults_and_millicores() -> None:
    model = JobConfig.model_validate({"name": "w", "command": ["x"], "version": 2, "resources": {"cpu": "500m"}})
    assert model.version == "2"
    j = model.to_job()
    assert j.count == 1 and j.driver == "process" and j.resources == Resources(0.5, 0)
    assert SchedulerConfig().algorithm == "binpack"


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"count": -1}, "count"),
        ({"affinity": [{"near": "db", "weight": 101}]}, "affinity"),
        ({"affinity": [{"near": "db", "weight": 0}]}, "affinity"),
        ({"driver": "podman"}, "driver"),
        ({"resources": {"memory": "12Qi"}}, "resources"),
        ({"health": {"port": "http", "interval": "soon"}}, "health"),
        ({"constraints": [{"attribute": "a", "op": "~"}]}, "constraints"),
        ({"constraints": [{"attribute": "a", "op": "regex", "value": "("}]}, "constraints"),
        ({"restart": {"attempts": 1, "delya": "1s"}}, "restart"),
    ],
)
def test_field_errors(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobConfig.model_validate(job(**fields))
    assert info.value.errors()[0]["loc"][0] == where


def test_node_field_errors() -> None:
    with pytest.raises(ValidationError):
        NodeConfig.model_validate({"name": "n", "capacity": "lots"})
    with pytest.raises(ValidationError):
        NodeConfig.model_validate({"name": "n", "status": "gone"})


def test_job_names_unique() -> None:
    assert problems({"jobs": [job(), job()]}) == ["jobs[1].name: job name 'web' is also used by jobs[0]"]


def test_node_names_unique_and_driver_host_known() -> None:
    nodes = [{"name": "a"}, {"name": "a"}, {"name": "b", "driver_host": "c"}]
    assert problems({"nodes": nodes}) == [
        "nodes[1].name: node name 'a' is also used by nodes[0]",
        "nodes[2].driver_host: unknown node 'c' (known: a, a, b)",
    ]


def test_affinity_must_name_a_job() -> None:
    assert problems({"jobs": [job(affinity=[{"near": "dbx"}])]}) == [
        "jobs[0].affinity[0].near: unknown job 'dbx' (known: web)"
    ]


def test_health_port_must_be_declared() -> None:
    assert problems({"jobs": [job(ports=["admin"], health={"http": "/", "port": "http"})]}) == [
        "jobs[0].health.port: unknown port 'http' (declared ports: admin)"
    ]


def test_port_variables_must_be_declared() -> None:
    data = job(command=["srv", "${PORT_HTTP}", "${PORT_ADMIN_API}"], ports=["admin-api"], env={"X": "${PORT_Y}"})
    assert problems({"jobs": [data]}) == [
        "jobs[0].command[1]: ${PORT_HTTP} refers to an undeclared port (declared ports: admin-api)",
        "jobs[0].env.X: ${PORT_Y} refers to an undeclared port (declared ports: admin-api)",
    ]


def test_references_syntax() -> None:
    data = job(
        command=["${HOST}", "${POINTSMAN_ALLOC_ID}", "${A}", "$${literal}", "${upstream:anything-else}"],
        env={"A": "1", "B": "${upstream:bad name}", "C": "${1x}", "D": "${NOPE}"},
    )
    assert problems({"jobs": [data]}) == [
        "jobs[0].env.B: bad reference ${upstream:bad name}: expected ${upstream:NAME} with a job or service name",
        "jobs[0].env.C: bad reference ${1x}: expected ${NAME} or ${upstream:NAME}",
        "jobs[0].env.D: unknown variable ${NOPE} (known: A, B, C, CONFIG_DIR, D, HOST, POINTSMAN_ALLOC_ID, STATE_DIR)",
    ]


def test_docker_driver_requires_image() -> None:
    assert problems({"jobs": [{"name": "d", "driver": "docker"}]}) == [
        "jobs[0].docker: the docker driver needs docker: {image: ...}"
    ]
    with pytest.raises(ValidationError):
        JobConfig.model_validate({"name": "d", "driver": "docker", "docker": {"command": ["x"]}})
    ok = {
        "name": "d",
        "driver": "docker",
        "ports": ["http"],
        "docker": {"image": "mini:latest", "command": ["${PORT_HTTP}"]},
    }
    assert problems({"jobs": [ok]}) == []
    bad = {"name": "d", "driver": "docker", "docker": {"image": "mini", "command": ["${PORT_X}"]}}
    assert problems({"jobs": [bad]}) == [
        "jobs[0].docker.command[0]: ${PORT_X} refers to an undeclared port (declared ports: none)"
    ]


def test_process_driver_requires_command() -> None:
    assert problems({"jobs": [{"name": "p"}]}) == ["jobs[0].command: the process driver needs a command"]
