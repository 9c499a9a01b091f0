"""The demo `make run` starts (configs/demo.yaml), end to end: PostgreSQL and two web instances
run as jobs, orders go in through the router and the web instances' sidecars, the policies deny
what they say, the counts are per app, and an up/stop/up cycle loses nothing.

The file is used as it is, except: every address on port 0 (runs side by side, and the
machine's own 8080/9901 may be taken), `${CONFIG_DIR}` spelled out (the copy lives in
tmp_path), and the night-time window widened to the whole day so the denial is testable at
any hour.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from pointsman.config import read_yaml
from tests.pgserver import find_bin_dir
from tests.pointsman.harness import eventually, pointsman, up_args, write_config
from tests.pointsman.test_scheduler_up import PORT_BASE, _allocs, _json, _pid

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(find_bin_dir() is None, reason="no PostgreSQL server binaries (make deps)")


def _demo(tmp: Path) -> dict[str, Any]:
    text = (ROOT / "configs" / "demo.yaml").read_text().replace("${CONFIG_DIR}", str(ROOT / "configs"))
    data: dict[str, Any] = read_yaml(text)
    data["admin"]["listen"] = "127.0.0.1:0"
    data["discovery"]["dns"]["listen"] = "127.0.0.1:0"
    data["discovery"]["state_dir"] = str(tmp / "state")
    for listener in data["listeners"]:
        listener["listen"] = "127.0.0.1:0"
    for rule in data["policies"]:
        if "when" in rule:
            rule["when"] = {"between": "00:00-23:59", "timezone": "UTC"}
    data["nodes"] = [{"name": "local", "reserved_ports": list(range(20000, PORT_BASE))}]
    return data


@pytest.mark.timeout(240)
async def test_the_demo_runs_polices_counts_and_survives_a_restart(tmp_path: Path) -> None:
    # tmp_path is private to root: the db job keeps its cluster where the postgres user can go
    # (scripts/demo-postgres.sh says where), as it does for a checkout under /root.
    config = tmp_path / "demo.yaml"
    write_config(config, _demo(tmp_path))
    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:

        async def healthy() -> bool:
            jobs = {j["name"]: j for j in (await _json(http, proc.url("/jobs")))["jobs"]}
            return jobs.keys() == {"db", "web"} and jobs["db"]["healthy"] == 1 and jobs["web"]["healthy"] == 2

        await eventually(healthy, 60, "db and two web instances healthy")
        status = await _json(http, proc.url("/status"))
        public, sql = status["listeners"]["public"], status["listeners"]["sql"]
        instances = set()
        for item in ("coffee", "tea", "cake", "bread", "soup"):
            async with http.post(f"http://{public}/orders", data={"item": item}) as resp:
                assert resp.status == 201, await resp.text()
                instances.add((await resp.json())["instance"])
        assert len(instances) == 2  # both web instances served
        async with http.get(f"http://{public}/orders") as resp:
            assert (await resp.json())["count"] == 5

        # DELETE from the app, through its sidecar: denied, SQLSTATE 42501, answered 403.
        async with http.post(f"http://{public}/orders/purge") as resp:
            assert resp.status == 403
            assert (await resp.json())["sqlstate"] == "42501"
        # DROP from a person's psql-like client through the shared SQL listener: denied too.
        host, port = sql.rsplit(":", 1)
        with (
            psycopg.connect(host=host, port=port, user="postgres", dbname="demo", sslmode="disable") as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-destructive-at-night"),
        ):
            conn.execute("DROP TABLE orders")

        async with http.get(proc.url("/metrics")) as resp:
            metrics = await resp.text()
        inserts = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("pointsman_sql_statements_total{") and 'app="web"' in line and 'verb="INSERT"' in line
        )
        assert inserts == 5.0  # counted under the job's name, by its sidecars
        allocs = await _allocs(http, proc.admin)
        first = {a["id"] for a in allocs}
        pids = [_pid(a) for a in allocs]
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit(30) == 0
    for pid in pids:  # Ctrl-C leaves no process behind (the postmaster's children neither)
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text()

    try:
        # Up again on the same state: the same allocations, and the orders are still there.
        async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:
            await eventually(healthy, 60, "healthy again")
            assert {a["id"] for a in await _allocs(http, proc.admin)} == first
            public = (await _json(http, proc.url("/status")))["listeners"]["public"]
            async with http.get(f"http://{public}/orders") as resp:
                assert (await resp.json())["count"] == 5
    finally:
        datadir = tmp_path / "state" / "demo-pg"
        if datadir.is_symlink():  # the cluster was kept outside the private tmp_path
            shutil.rmtree(datadir.resolve().parent, ignore_errors=True)
