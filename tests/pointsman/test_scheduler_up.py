"""`pointsman up` with jobs, end to end: the scheduler places and runs real processes, the
registry and DNS follow them, and the router sends traffic to them; an instance killed is
replaced while requests keep flowing; a restart of pointsman adopts what still runs."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scheduler.drivers.process import proc_starttime
from tests.pointsman.harness import eventually, pointsman, run_cli, up_args, write_config

DNS_LINE = re.compile(r"pointsman: dns udp\+tcp (\S+):(\d+)$")
PORT_BASE = 20000 + os.getpid() % 40 * 250
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=5)


def _config(state: Path, count: int = 2, **job: Any) -> dict[str, Any]:
    return {
        "admin": {"listen": "127.0.0.1:0"},
        "discovery": {"state_dir": str(state), "dns": {"listen": "127.0.0.1:0", "ttl": "1s"}},
        # Ports the test run owns, so that runs side by side do not collide.
        "nodes": [{"name": "local", "reserved_ports": list(range(20000, PORT_BASE))}],
        "clusters": {"web": {"service": "web", "port": "http"}},
        "listeners": [
            {
                "name": "public",
                "listen": "127.0.0.1:0",
                # An instance that died is refused until its deregistration reaches the router
                # (a few ms): a refused connection is retried on another instance.
                "routes": [{"match": {"path_prefix": "/"}, "to": "web", "retries": {"on": ["connect-failure"]}}],
            }
        ],
        "jobs": [
            {
                "name": "web",
                "command": [sys.executable, "-m", "http.server", "${PORT_HTTP}", "--bind", "${HOST}"],
                "count": count,
                "ports": ["http"],
                "resources": {"cpu": 0.1, "memory": "64Mi"},
                "health": {"http": "/", "port": "http", "interval": "0.2s", "grace": "5s"},
                "restart": {"attempts": 3, "delay": "0.1s"},
                "shutdown_delay": "0.3s",
                **job,
            }
        ],
    }


async def _json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _allocs(http: aiohttp.ClientSession, admin: str) -> list[dict[str, Any]]:
    return list((await _json(http, f"http://{admin}/allocations"))["allocations"])


def _pid(alloc: dict[str, Any]) -> int:
    return int(alloc["handle"]["ref"].split(":")[0])


async def _srv(port: str) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        "dig",
        "@127.0.0.1",
        "-p",
        port,
        "+short",
        "+tries=1",
        "+time=2",
        "_http._tcp.web.svc.internal",
        "SRV",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    return sorted(line.split()[2] for line in out.decode().splitlines() if line.strip())


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig (bind9-dnsutils) is not installed")
async def test_a_killed_instance_is_replaced_and_dns_and_router_follow(tmp_path: Path) -> None:
    config = tmp_path / "pointsman.yaml"
    write_config(config, _config(tmp_path / "state"))
    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:
        dns_port = next(m for line in proc.lines if (m := DNS_LINE.search(line))).group(2)

        async def healthy(n: int) -> bool:
            jobs = (await _json(http, proc.url("/jobs")))["jobs"]
            return bool(jobs) and jobs[0]["healthy"] == n

        await eventually(lambda: healthy(2), 15, "two healthy instances")
        allocs = await _allocs(http, proc.admin)
        ports = sorted(str(a["ports"]["http"]) for a in allocs)
        await eventually(lambda: _equal(_srv(dns_port), ports), 5, "DNS answers both instances")

        # Traffic through the router while one instance is killed.
        results: list[int] = []
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                try:
                    async with http.get(proc.listener_url("public", "/"), timeout=CLIENT_TIMEOUT) as resp:
                        await resp.read()
                        results.append(resp.status)
                except TimeoutError:
                    results.append(-2)
                except aiohttp.ClientError:
                    results.append(-1)

        clients = [asyncio.create_task(client()) for _ in range(4)]
        await asyncio.sleep(0.5)
        victim = allocs[0]
        os.kill(_pid(victim), signal.SIGKILL)
        # The DNS answer loses it, then has it back once the restarted process passes its check.
        await eventually(
            lambda: _equal(_srv(dns_port), [p for p in ports if p != str(victim["ports"]["http"])]),
            5,
            "DNS drops the killed instance",
        )
        await eventually(lambda: _equal(_srv(dns_port), ports), 15, "DNS has it back")
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)
        failed = [s for s in results if s != 200]
        assert len(results) > 100
        # Only requests in flight on the killed process may fail: at most one per client.
        assert len(failed) <= 4, f"{len(failed)} failed of {len(results)}: {failed[:10]}"

        after = {a["id"]: a for a in await _allocs(http, proc.admin)}
        assert set(after) == {a["id"] for a in allocs}  # restarted in place: same allocations
        assert after[victim["id"]]["restarts"] == 1
        assert "signal 9" in after[victim["id"]]["last_exit"]
        assert _pid(after[victim["id"]]) != _pid(victim)

        # `pointsman logs`: the task's own output (http.server logs requests on stderr).
        code, out, err = await run_cli("logs", victim["id"][:9], "--stderr", "--admin", proc.admin)
        assert code == 0, err
        assert '"GET / HTTP/1.1" 200' in out
        code, _, err = await run_cli("logs", "nosuch", "--admin", proc.admin)
        assert code == 1 and "no such allocation" in err

        async with http.get(proc.url("/metrics")) as resp:
            metrics = await resp.text()
        assert 'pointsman_scheduler_restarts_total{app="web"} 1.0' in metrics
        running = r'pointsman_scheduler_allocations\{[^}]*health="passing"[^}]*status="running"[^}]*\} 2\.0'
        assert re.search(running, metrics)

        pids = [_pid(a) for a in after.values()]
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit() == 0
        assert all(proc_starttime(pid) is None for pid in pids), "Ctrl-C leaves no instance behind"


async def _equal(got: Any, want: list[str]) -> bool:
    return bool(await got == want)


async def test_jobs_api_adds_validates_and_removes(tmp_path: Path) -> None:
    config = tmp_path / "pointsman.yaml"
    data = _config(tmp_path / "state", count=1)
    write_config(config, data)
    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:
        # What runs where, for a person (bound addresses, not the config's port 0).
        await proc.wait_for(re.compile(r"^pointsman is up:$"))
        public = await proc.wait_for(re.compile(r"^  public +(http://\S+)$"))
        assert public.group(1) == f"http://{proc.listeners['public']}/"
        await proc.wait_for(re.compile(r"^  jobs +web x1 "))
        job = {
            "name": "echo",
            "command": [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
            "resources": {"cpu": 0.1, "memory": "16Mi"},
        }
        async with http.post(proc.url("/jobs"), json=job) as resp:
            assert resp.status == 201, await resp.text()
            body = await resp.json()
        assert (body["name"], body["source"], body["count"]) == ("echo", "api", 1)
        async with http.post(proc.url("/jobs"), json={**job, "count": -1, "bogus": 1}) as resp:
            assert resp.status == 400
            errors = (await resp.json())["errors"]
        assert {e["path"] for e in errors} == {"count", "bogus"}
        async with http.post(proc.url("/jobs"), json={**job, "name": "web"}) as resp:
            assert resp.status == 409  # declared in the config file
        async with http.post(proc.url("/jobs"), json={**job, "affinity": [{"near": "nope"}]}) as resp:
            assert resp.status == 400
            assert (await resp.json())["errors"][0]["path"] == "affinity[0].near"

        async def echo_running() -> bool:
            return any(a["job"] == "echo" and a["status"] == "running" for a in await _allocs(http, proc.admin))

        await eventually(echo_running, 10, "echo running")
        (echo,) = [a for a in await _allocs(http, proc.admin) if a["job"] == "echo"]

        async def printed() -> bool:
            async with http.get(proc.url(f"/allocations/{echo['id']}/logs")) as resp:
                assert resp.status == 200
                return (await resp.text()) == "up\n"

        await eventually(printed, 5, "the task's stdout through the API")

        # An unsatisfiable job is explained, not left silently pending.
        huge = {**job, "name": "huge", "resources": {"cpu": 4096, "memory": "1Mi"}}
        async with http.post(proc.url("/jobs"), json=huge) as resp:
            assert resp.status == 201
            assert (await resp.json())["unplaced"] == {"count": 1, "reason": "Resources exhausted on 1 node: cpu"}

        async with http.delete(proc.url("/jobs/echo")) as resp:
            assert resp.status == 200
        await eventually(lambda: _no_job(http, proc.admin, "echo"), 10, "echo stopped")
        assert proc_starttime(_pid(echo)) is None
        async with http.delete(proc.url("/jobs/web")) as resp:
            assert resp.status == 409

        # Draining the only node: web cannot go anywhere else, and says so.
        async with http.post(proc.url("/nodes/local"), json={"status": "draining"}) as resp:
            assert resp.status == 200
        jobs = {j["name"]: j for j in (await _json(http, proc.url("/jobs")))["jobs"]}
        assert jobs["web"]["unplaced"]["reason"] == 'Node status "draining" filtered 1 node'


async def _no_job(http: aiohttp.ClientSession, admin: str, job: str) -> bool:
    return not any(a["job"] == job for a in await _allocs(http, admin))


async def test_restart_of_pointsman_adopts_and_a_clean_stop_resumes(tmp_path: Path) -> None:
    config = tmp_path / "pointsman.yaml"
    write_config(config, _config(tmp_path / "state"))
    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:

        async def two_running() -> bool:
            return sum(a["status"] == "running" for a in await _allocs(http, proc.admin)) == 2

        await eventually(two_running, 15, "two running")
        first = {a["id"]: (_pid(a), a["ports"]["http"]) for a in await _allocs(http, proc.admin)}
        proc.send_signal(signal.SIGKILL)  # a crash: nothing is stopped
        await proc.wait_exit()
    assert all(proc_starttime(pid) is not None for pid, _ in first.values())

    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:
        await eventually(two_running, 15, "adopted")
        adopted = {a["id"]: (_pid(a), a["ports"]["http"]) for a in await _allocs(http, proc.admin)}
        assert adopted == first, "the same processes, no duplicates"
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit() == 0
    assert all(proc_starttime(pid) is None for pid, _ in first.values())

    # A clean stop keeps the allocations: the next start brings the same ones back.
    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:
        await eventually(two_running, 15, "resumed")
        resumed = {a["id"]: a["ports"]["http"] for a in await _allocs(http, proc.admin)}
        assert resumed == {alloc: port for alloc, (_, port) in first.items()}
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait_exit() == 0


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None and shutil.which("ip", path="/usr/sbin:/sbin") is None:
        return "network namespaces need the ip command (iproute2)"
    return None


@pytest.mark.skipif(_netns_unavailable() is not None, reason=_netns_unavailable() or "")
async def test_namespaced_instances_have_their_own_address_and_resolve_internal_names(tmp_path: Path) -> None:
    config = tmp_path / "pointsman.yaml"
    data = _config(tmp_path / "state", count=1, network="namespace")
    lookup = "import socket; print(socket.getaddrinfo('web.svc.internal', 80)[0][4][0], flush=True)"
    data["jobs"].append(
        {
            "name": "client",
            "command": [sys.executable, "-c", lookup + "; import time; time.sleep(60)"],
            "network": "namespace",
            "resources": {"cpu": 0.1, "memory": "32Mi"},
            # The lookup needs web registered and passing: fail, back off, try again until then.
            "restart": {"attempts": 20, "delay": "0.2s", "max_delay": "0.5s"},
        }
    )
    write_config(config, data)
    async with pointsman(*up_args(config)) as proc, aiohttp.ClientSession() as http:

        async def web_healthy() -> bool:
            return any(j["name"] == "web" and j["healthy"] == 1 for j in (await _json(http, proc.url("/jobs")))["jobs"])

        await eventually(web_healthy, 20, "web healthy in its namespace")
        (web,) = [a for a in await _allocs(http, proc.admin) if a["job"] == "web"]
        assert web["address"].startswith("10.213."), web
        # The router reaches it at its own address.
        async with http.get(proc.listener_url("public", "/"), timeout=CLIENT_TIMEOUT) as resp:
            assert resp.status == 200
        # An unmodified program's getaddrinfo() in another namespace finds it through the internal DNS.

        async def client_printed() -> bool:
            clients = [a for a in await _allocs(http, proc.admin) if a["job"] == "client"]
            if not clients:
                return False
            async with http.get(proc.url(f"/allocations/{clients[0]['id']}/logs")) as resp:
                return web["address"] in await resp.text()

        await eventually(client_printed, 20, "the client resolved web.svc.internal")
