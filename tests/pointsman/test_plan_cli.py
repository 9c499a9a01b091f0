"""`pointsman plan` as a user runs it: a real process on temp config files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.pointsman.harness import run_cli, write_config


def node(name: str, cpu: float = 1, memory: str = "1Gi", **attributes: str) -> dict[str, Any]:
    return {"name": name, "capacity": {"cpu": cpu, "memory": memory}, "attributes": attributes}


def job(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "command": ["sleep", "1000"], **fields}


async def plan(tmp_path: Path, config: dict[str, Any], *args: str) -> tuple[int, str, str]:
    path = tmp_path / "plan.yaml"
    write_config(path, config)
    return await run_cli("plan", str(path), *args)


def placements(out: str, job_name: str) -> dict[int, tuple[str, str]]:
    """index -> (node, ports text) from lines like `  + web[0] -> a  ports http=20000`."""
    found = {}
    for m in re.finditer(rf"^  \+ {job_name}\[(\d+)\] -> (\S+)(?:  ports (.*))?$", out, re.M):
        found[int(m.group(1))] = (m.group(2), m.group(3) or "")
    return found


async def test_plan_places_every_instance_with_ports(tmp_path: Path) -> None:
    config = {
        "nodes": [node("a"), node("b")],
        "jobs": [job("web", count=3, ports=["http", "admin"], resources={"cpu": 0.5, "memory": "128Mi"})],
    }
    code, out, err = await plan(tmp_path, config, "--eval-id", "e1")
    assert code == 0, out + err
    web = placements(out, "web")
    assert sorted(web) == [0, 1, 2]
    nodes = [n for n, _ in web.values()]
    assert sorted(set(nodes)) == ["a", "b"]  # 1 cpu per node: two fit on one, the third opens the other
    for _, ports in web.values():
        assert re.fullmatch(r"http=(\d+) admin=(\d+)", ports)
        assert all(20000 <= int(p) <= 32000 for p in re.findall(r"\d+", ports))
    # Ports are distinct per node.
    by_node: dict[str, list[str]] = {}
    for n, ports in web.values():
        by_node.setdefault(n, []).extend(re.findall(r"\d+", ports))
    assert all(len(set(p)) == len(p) for p in by_node.values())
    assert "Placed 3 of 3 instances." in out
    # The same eval id gives the same plan.
    again = await plan(tmp_path, config, "--eval-id", "e1")
    assert again == (code, out, err)


async def test_unsatisfiable_constraint_is_explained(tmp_path: Path) -> None:
    config = {
        "nodes": [node("a", premise="cloud"), node("b", premise="cloud"), node("c", premise="onprem")],
        "jobs": [
            job("web", count=2, constraints=[{"attribute": "premise", "value": "gpu-farm"}]),
            job("ok", count=1),
        ],
    }
    code, out, err = await plan(tmp_path, config)
    assert code == 2, out + err
    assert "  ! web[0] not placed" in out and "  ! web[1] not placed" in out
    assert "(3 of 3 nodes rejected)" in out
    assert 'Constraint "premise = gpu-farm" filtered 3 nodes' in out
    assert len(placements(out, "ok")) == 1
    assert "Placed 1 of 3 instances: 2 could not be placed" in out


async def test_resources_exhausted_is_explained(tmp_path: Path) -> None:
    config = {
        "nodes": [node("a", premise="onprem"), node("b", premise="cloud")],
        "jobs": [
            job(
                "big", count=2, resources={"memory": "768Mi"}, constraints=[{"attribute": "premise", "value": "onprem"}]
            )
        ],
    }
    code, out, _ = await plan(tmp_path, config)
    assert code == 2
    assert placements(out, "big") == {0: ("a", "")}
    assert "big: 1 failed (index 1)" in out
    assert 'Constraint "premise = onprem" filtered 1 node' in out
    assert "Resources exhausted on 1 node: memory" in out


async def test_near_lands_on_the_db_node(tmp_path: Path) -> None:
    nodes = [node(f"n{i}", cpu=4, memory="4Gi", role=["big", "app", "db", "app"][i]) for i in range(4)]
    db = job("db", ports=["pg"], constraints=[{"attribute": "role", "value": "db"}])
    # Fills n0, which bin-packing would otherwise prefer for web.
    filler = job("filler", resources={"cpu": 3, "memory": "3Gi"}, constraints=[{"attribute": "role", "value": "big"}])
    web = job("web", count=1, ports=["http"], resources={"cpu": 0.5, "memory": "256Mi"})
    config: dict[str, Any] = {"nodes": nodes}
    code, out, err = await plan(tmp_path, {**config, "jobs": [filler, db, web]})
    assert code == 0, out + err
    assert placements(out, "db") == {0: ("n2", "pg=20000")}
    assert placements(out, "web")[0][0] == "n0"
    # With the affinity web goes next to db, even listed first: what a job is near is placed first.
    near = {**web, "affinity": [{"near": "db", "weight": 100}]}
    code, out, err = await plan(tmp_path, {**config, "jobs": [near, filler, db]})
    assert code == 0, out + err
    assert placements(out, "web") == {0: ("n2", "http=20001")}
    # --job web alone still places db first, and shows only web.
    code, out, err = await plan(tmp_path, {**config, "jobs": [near, filler, db]}, "--job", "web")
    assert code == 0, out + err
    assert "(placed first for affinity: db)" in out
    assert placements(out, "web")[0][0] == "n2"
    assert placements(out, "db") == {}


async def test_implicit_local_node(tmp_path: Path) -> None:
    code, out, err = await plan(tmp_path, {"jobs": [job("web", ports=["http"])]})
    assert code == 0, out + err
    assert placements(out, "web") == {0: ("local", "http=20000")}
    assert "(1 node, algorithm binpack)" in out


async def test_bad_file_reports_paths(tmp_path: Path) -> None:
    config = {
        "nodes": [node("a")],
        "jobs": [
            job("web", ports=["http"], health={"port": "admin"}, affinity=[{"near": "dbx"}]),
            job("d", driver="docker", count=-1),
        ],
    }
    code, out, err = await plan(tmp_path, config)
    assert code == 1
    assert out == ""
    assert "jobs[1].count: Input should be greater than or equal to 0" in err
    config["jobs"][1] = job("d", driver="docker")
    code, out, err = await plan(tmp_path, config)
    assert code == 1
    path = tmp_path / "plan.yaml"
    assert f"{path}: invalid config (3 problems)" in err
    assert f"{path}: jobs[0].health.port: unknown port 'admin' (declared ports: http)" in err
    assert f"{path}: jobs[0].affinity[0].near: unknown job 'dbx' (known: web, d)" in err
    assert f"{path}: jobs[1].docker: the docker driver needs docker: {{image: ...}}" in err


async def test_unknown_job(tmp_path: Path) -> None:
    code, _, err = await plan(tmp_path, {"jobs": [job("web")]}, "--job", "nope")
    assert code == 1
    assert "unknown job 'nope' (known: web)" in err
