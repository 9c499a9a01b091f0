"""``pointsman status``: the summary and its text as pure functions of literal answers, then
the real command against a real ``pointsman up`` running a job behind a listener."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

from pointsman import status
from tests.pointsman.harness import eventually, pointsman, run_cli, up_args, write_config

# Ports the test run owns (as in test_scheduler_up.py, shifted so both can run side by side).
PORT_BASE = 20000 + os.getpid() % 40 * 250 + 125

ANSWERS: dict[str, Any] = {
    "status": {
        "state": "ready",
        "file": "/etc/pointsman.yaml",
        "hash": "abc123",
        "listeners": {"public": "127.0.0.1:8080"},
        "last_reload": {
            "source": "file change",
            "at": "2026-01-02T03:04:05+00:00",
            "status": "refused",
            "hash": "abc123",
            "file": "/etc/pointsman.yaml",
            "errors": [{"path": "listeners[0].listen", "reason": "not host:port"}],
        },
    },
    "config": {
        "file": "/etc/pointsman.yaml",
        "hash": "abc123",
        "config": {
            "listeners": [
                {"name": "public", "listen": "127.0.0.1:0", "protocol": "http", "routes": [{"to": "web"}]},
                {"name": "db", "listen": "127.0.0.1:5433", "protocol": "postgres", "to": "pg"},
            ],
            "clusters": {"web": {"service": "web", "port": "http"}, "pg": {"endpoints": ["127.0.0.1:5432"]}},
        },
    },
    "clusters": {
        "web": {
            "balancer": "round_robin",
            "endpoints": [
                {"address": "127.0.0.1:20001", "healthy": True, "ejected": False, "active_requests": 2},
                {"address": "127.0.0.1:20002", "healthy": True, "ejected": True, "ejected_for": 4.5},
            ],
        },
        "pg": {"balancer": "round_robin", "endpoints": [{"address": "127.0.0.1:5432", "healthy": False}]},
    },
    "jobs": {
        "jobs": [
            {
                "name": "web",
                "version": "2",
                "count": 3,
                "running": 2,
                "healthy": 1,
                "restarts": 4,
                "unplaced": {"count": 1, "reason": "Resources exhausted on 1 node: cpu"},
            }
        ]
    },
    "allocations": {
        "allocations": [
            {
                "id": "web-0-00000000000a",
                "job": "web",
                "version": "2",
                "index": 0,
                "node": "local",
                "status": "running",
                "health": "passing",
                "address": "127.0.0.1",
                "ports": {"http": 20001},
                "restarts": 1,
                "last_exit": "killed by signal 9",
            },
            {
                "id": "web-1-00000000000b",
                "job": "web",
                "version": "2",
                "index": 1,
                "node": "local",
                "status": "running",
                "health": "critical",
                "address": "127.0.0.1",
                "ports": {"http": 20002},
                "restarts": 0,
                "last_exit": "",
            },
        ]
    },
    "services": {
        "revision": 7,
        "services": {
            "web": [
                {
                    "id": "web-1-00000000000b",
                    "address": "127.0.0.1",
                    "ports": {"http": 20002},
                    "health": "critical",
                    "node": "local",
                    "version": "2",
                },
                {
                    "id": "web-0-00000000000a",
                    "address": "127.0.0.1",
                    "ports": {"http": 20001},
                    "health": "passing",
                    "node": "local",
                    "version": "2",
                },
            ]
        },
    },
}


def _section(text: str, heading: str) -> list[list[str]]:
    """The lines under ``heading`` up to the next blank line, split on runs of spaces."""
    lines = text.splitlines()
    start = lines.index(heading)
    out = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        out.append(line.split())
    return out


# -- pure functions ---------------------------------------------------------------------------


def test_summarize_keeps_the_facts() -> None:
    summary = status.summarize(ANSWERS)
    assert summary["jobs"] == [
        {
            "name": "web",
            "version": "2",
            "count": 3,
            "running": 2,
            "healthy": 1,
            "restarts": 4,
            "unplaced": "1: Resources exhausted on 1 node: cpu",
        }
    ]
    assert [a["id"] for a in summary["allocations"]] == ["web-0-00000000000a", "web-1-00000000000b"]
    assert summary["allocations"][1]["last_exit"] is None  # "" from the API: nothing to show
    assert [(s["service"], s["id"]) for s in summary["services"]] == [
        ("web", "web-0-00000000000a"),
        ("web", "web-1-00000000000b"),
    ]
    assert summary["listeners"] == [
        # The bound address from GET /status, not the port 0 the file asks for.
        {"name": "public", "protocol": "http", "address": "127.0.0.1:8080", "clusters": ["web"]},
        {"name": "db", "protocol": "postgres", "address": "127.0.0.1:5433", "clusters": ["pg"]},
    ]
    web = next(c for c in summary["clusters"] if c["name"] == "web")
    assert (web["service"], web["healthy"], len(web["endpoints"])) == ("web:http", 1, 2)
    assert summary["reload"]["last"]["status"] == "refused"
    json.dumps(summary)  # what --json prints


def test_render_every_section() -> None:
    text = status.render(status.summarize(ANSWERS), admin="127.0.0.1:9901")
    assert text.splitlines()[0] == "pointsman status - admin 127.0.0.1:9901"
    assert _section(text, "JOBS") == [
        ["NAME", "VERSION", "COUNT", "RUNNING", "HEALTHY", "RESTARTS", "UNPLACED"],
        ["web", "2", "3", "2", "1", "4", "1:", "Resources", "exhausted", "on", "1", "node:", "cpu"],
    ]
    assert _section(text, "ALLOCATIONS") == [
        ["ID", "JOB", "VER", "IDX", "NODE", "STATUS", "HEALTH", "ADDRESS", "RESTARTS"],
        ["web-0-00000000000a", "web", "2", "0", "local", "running", "passing", "127.0.0.1", "http=20001", "1"],
        ["last", "exit:", "killed", "by", "signal", "9"],
        ["web-1-00000000000b", "web", "2", "1", "local", "running", "critical", "127.0.0.1", "http=20002", "0"],
    ]
    assert _section(text, "SERVICES")[1] == [
        *("web", "web-0-00000000000a", "127.0.0.1", "http=20001", "passing", "local", "2")
    ]
    assert _section(text, "LISTENERS")[1:] == [
        ["public", "http", "127.0.0.1:8080", "web"],
        ["db", "postgres", "127.0.0.1:5433", "pg"],
    ]
    assert _section(text, "CLUSTERS") == [
        ["CLUSTER", "FROM", "HEALTHY", "ENDPOINT", "HEALTH", "ACTIVE"],
        ["pg", "endpoints", "0/1", "127.0.0.1:5432", "unhealthy", "-"],
        ["web", "web:http", "1/2", "127.0.0.1:20001", "healthy", "2"],
        ["127.0.0.1:20002", "ejected", "(4.5s", "left)", "-"],
    ]
    lines = text.splitlines()
    assert lines[lines.index("RELOAD") + 1 : lines.index("JOBS") - 1] == [
        "state ready, config hash abc123",
        "file /etc/pointsman.yaml",
        "last reload: refused at 2026-01-02T03:04:05+00:00 (file change), hash abc123",
        "  /etc/pointsman.yaml: listeners[0].listen: not host:port",
    ]
    assert max(len(line) for line in text.splitlines()) <= 100


def test_render_aligns_columns() -> None:
    text = status.render(status.summarize(ANSWERS))
    lines = text.splitlines()
    heading = lines.index("ALLOCATIONS") + 1
    header, row = lines[heading], lines[heading + 1]
    assert row.index("running") == header.index("STATUS")
    assert row.index("127.0.0.1") == header.index("ADDRESS")


def test_absent_apis_are_not_running() -> None:
    answers = {"config": ANSWERS["config"], "status": None, "clusters": None, "jobs": None, "services": None}
    summary = status.summarize(answers)
    for key in ("jobs", "allocations", "services", "listeners", "clusters"):
        assert summary[key] is None
    # An instance without GET /status still has the running hash (from GET /config).
    assert summary["reload"] == {"state": None, "file": "/etc/pointsman.yaml", "hash": "abc123", "last": None}
    text = status.render(summary)
    for heading in ("JOBS", "ALLOCATIONS", "SERVICES", "LISTENERS", "CLUSTERS"):
        assert _section(text, heading) == [status.NOT_RUNNING.split()]


def test_empty_sections_say_so() -> None:
    answers = {
        **ANSWERS,
        "jobs": {"jobs": []},
        "allocations": {"allocations": []},
        "services": {"revision": 0, "services": {}},
        "clusters": {},
        "status": {**ANSWERS["status"], "last_reload": None},
    }
    text = status.render(status.summarize(answers))
    assert _section(text, "JOBS")[1] == ["no", "jobs"]
    assert _section(text, "SERVICES")[1] == ["no", "instances", "registered"]
    assert _section(text, "CLUSTERS")[1] == ["no", "clusters"]
    assert "last reload: none since start" in text


# -- the real command ---------------------------------------------------------------------------


def _config(state: Path) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "discovery": {"state_dir": str(state), "dns": {"listen": "127.0.0.1:0"}},
        "nodes": [{"name": "local", "reserved_ports": [*range(20000, PORT_BASE), *range(PORT_BASE + 125, 30000)]}],
        "clusters": {"web": {"service": "web", "port": "http"}},
        "listeners": [
            {"name": "public", "listen": "127.0.0.1:0", "routes": [{"match": {"path_prefix": "/"}, "to": "web"}]}
        ],
        "jobs": [
            {
                "name": "web",
                "command": [sys.executable, "-m", "http.server", "${PORT_HTTP}", "--bind", "${HOST}"],
                "count": 2,
                "ports": ["http"],
                "resources": {"cpu": 0.1, "memory": "64Mi"},
                "health": {"http": "/", "port": "http", "interval": "0.2s", "grace": "5s"},
                "shutdown_delay": "0.1s",
            }
        ],
    }


async def test_status_of_a_running_instance(tmp_path: Path) -> None:
    config = tmp_path / "pointsman.yaml"
    write_config(config, _config(tmp_path / "state"))
    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:

        async def healthy() -> bool:
            async with http.get(proc.url("/jobs")) as resp:
                jobs = (await resp.json())["jobs"]
            async with http.get(proc.url("/clusters")) as resp:
                endpoints = (await resp.json())["web"]["endpoints"]
            return jobs[0]["healthy"] == 2 and len(endpoints) == 2

        await eventually(healthy, 20, "two healthy instances, both in the router's cluster")
        async with http.get(proc.url("/allocations")) as resp:
            allocs = (await resp.json())["allocations"]

        code, text, err = await run_cli("status", "--admin", proc.admin)
        assert code == 0, err
        print(text)  # shown with pytest -s: the sample output
        assert _section(text, "JOBS")[1] == ["web", "1", "2", "2", "2", "0", "-"]
        rows = {row[0]: row for row in _section(text, "ALLOCATIONS")[1:]}
        for alloc in allocs:
            assert rows[alloc["id"]][5:9] == ["running", "passing", "127.0.0.1", f"http={alloc['ports']['http']}"]
        instances = {row[1]: row for row in _section(text, "SERVICES")[1:]}
        assert set(instances) == {a["id"] for a in allocs}
        assert all(row[0] == "web" and row[4] == "passing" for row in instances.values())
        assert _section(text, "LISTENERS")[1] == ["public", "http", proc.listeners["public"], "web"]
        clusters = _section(text, "CLUSTERS")[1:]
        assert clusters[0][:3] == ["web", "web:http", "2/2"]
        endpoints = {row[-3]: row[-2] for row in clusters}
        assert endpoints == {f"127.0.0.1:{a['ports']['http']}": "healthy" for a in allocs}
        assert "last reload: none since start" in text
        assert max(len(line) for line in text.splitlines() if not line.startswith("file ")) <= 100

        # A reload (unchanged file) is the last reload from then on.
        assert (await run_cli("reload", "--admin", proc.admin))[0] == 0
        code, out, err = await run_cli("status", "--admin", proc.admin, "--json")
        assert code == 0, err
        summary = json.loads(out)
        assert set(summary) == {"jobs", "allocations", "services", "listeners", "clusters", "reload"}
        (job,) = summary["jobs"]
        assert (job["name"], job["count"], job["running"], job["healthy"]) == ("web", 2, 2, 2)
        assert {a["id"] for a in summary["allocations"]} == {a["id"] for a in allocs}
        assert {s["id"] for s in summary["services"]} == {a["id"] for a in allocs}
        assert summary["listeners"][0]["address"] == proc.listeners["public"]
        assert summary["clusters"][0]["healthy"] == 2
        last = summary["reload"]["last"]
        assert (last["status"], last["source"]) == ("unchanged", "admin API")
        assert summary["reload"]["hash"] == last["hash"] and summary["reload"]["state"] == "ready"


async def test_status_without_discovery_or_jobs(tmp_path: Path) -> None:
    config = tmp_path / "pointsman.yaml"
    write_config(
        config,
        {
            "admin": {"listen": "127.0.0.1:0"},
            "clusters": {"static": {"endpoints": ["127.0.0.1:9"]}},
            "listeners": [{"name": "edge", "listen": "127.0.0.1:0", "protocol": "tcp", "to": "static"}],
        },
    )
    async with pointsman(*up_args(config)) as proc:
        code, text, err = await run_cli("status", "--admin", proc.admin)
        assert code == 0, err
        for heading in ("JOBS", "ALLOCATIONS", "SERVICES"):
            assert _section(text, heading) == [status.NOT_RUNNING.split()]
        assert _section(text, "LISTENERS")[1] == ["edge", "tcp", proc.listeners["edge"], "static"]
        assert _section(text, "CLUSTERS")[1] == ["static", "endpoints", "1/1", "127.0.0.1:9", "healthy", "0"]
        code, out, _ = await run_cli("status", "--admin", proc.admin, "--json")
        summary = json.loads(out)
        assert (summary["jobs"], summary["allocations"], summary["services"]) == (None, None, None)


async def test_status_of_an_unreachable_instance(closed_port: int) -> None:
    code, out, err = await run_cli("status", "--admin", f"127.0.0.1:{closed_port}")
    assert code == 1 and out == ""
    assert f"127.0.0.1:{closed_port}/status: cannot reach the admin API" in err
