"""ProcessDriver with real processes: exit codes, signals, logs, env/port expansion, adoption
after a restart (a second driver on the same state dir), orphan cleanup and cgroup limits: v2
where the host has it, v1 (memory and cpu hierarchies) on legacy/hybrid hosts, both on the real
kernel (an OOM kill, CPU throttling), skipped only where the hierarchy is not writable."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scheduler.cgroups import CPU_PERIOD, CgroupV1, CgroupV2
from scheduler.driver import DriverError, TaskSpec, expand, expand_spec, task_variables
from scheduler.drivers.process import ProcessDriver, proc_starttime

PY = sys.executable
READY = "print('ready', flush=True); "


def spec(alloc_id: str, *command: str, **kw: object) -> TaskSpec:
    fields: dict[str, object] = {"env": {}, "ports": {}, "cpu": 0.0, "memory": 0}
    fields.update(kw)
    return TaskSpec(alloc_id=alloc_id, job="web", command=command, **fields)  # type: ignore[arg-type]


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[ProcessDriver]:
    drv = ProcessDriver(tmp_path / "state")
    yield drv
    # Whatever a test left running (in any driver instance on this state dir) dies here.
    await drv.cleanup(keep=set())
    for child in list(drv._children.values()):
        if child.process.returncode is None:
            child.process.kill()
            await child.process.wait()


async def wait_for_log(path: Path, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        await asyncio.sleep(0.02)
    raise AssertionError(f"{text!r} not in {path} after {timeout}s: {content!r}")


# -- expansion ---------------------------------------------------------------------------------


def test_expand_ports_host_env_and_escape() -> None:
    s = spec(
        "a1",
        "x",
        env={"NAME": "api", "URL": "http://${HOST}:${PORT_ADMIN_API}"},
        ports={"http": 8080, "admin-api": 9090},
    )
    variables = task_variables(s)
    assert variables["PORT_HTTP"] == "8080"
    assert variables["PORT_ADMIN_API"] == "9090"
    assert expand("--bind=${HOST}:${PORT_HTTP} ${NAME} $${HOST} $HOME", variables) == (
        "--bind=127.0.0.1:8080 api ${HOST} $HOME"
    )
    command, env = expand_spec(s)
    assert command == ("x",)
    assert env["URL"] == "http://127.0.0.1:9090"
    assert env["POINTSMAN_ALLOC_ID"] == "a1"


def test_expand_unknown_variable_is_an_error() -> None:
    with pytest.raises(DriverError, match=r"unknown variable \$\{PORT_HTTPS\}.*known: HOST, PORT_HTTP"):
        expand("serve ${PORT_HTTPS}", {"HOST": "h", "PORT_HTTP": "1"})
    with pytest.raises(DriverError, match="bad reference"):
        expand("${not a name}", {})


async def test_start_rejects_bad_specs(driver: ProcessDriver) -> None:
    with pytest.raises(DriverError, match="unknown variable"):
        await driver.start(spec("a1", PY, "-c", "pass", "${PORT_NOPE}"))
    with pytest.raises(DriverError, match="command not found"):
        await driver.start(spec("a2", "no-such-binary-pointsman"))
    with pytest.raises(DriverError, match="file name"):
        await driver.start(spec("../evil", PY))
    handle = await driver.start(spec("a3", PY, "-c", "import time; time.sleep(30)"))
    with pytest.raises(DriverError, match="already running"):
        await driver.start(spec("a3", PY, "-c", "pass"))
    await driver.stop(handle, grace=1)


# -- lifecycle ---------------------------------------------------------------------------------


async def test_exit_code_and_logs(driver: ProcessDriver) -> None:
    script = "import sys; print('out line'); print('err line', file=sys.stderr); sys.exit(3)"
    handle = await driver.start(spec("exit3", PY, "-c", script))
    pid, starttime = handle.ref.split(":")
    assert int(pid) > 0 and int(starttime) > 0
    assert handle.driver == "process"
    result = await asyncio.wait_for(driver.wait(handle), 5)
    assert (result.code, result.signal, result.reason) == (3, None, "exited 3")
    stdout, stderr = driver.log_paths("exit3")
    assert stdout.read_text() == "out line\n"
    assert stderr.read_text() == "err line\n"
    assert await driver.wait(handle) == result  # asking again gives the same answer
    assert not (driver.state_dir / "tasks" / "exit3.json").exists()


async def test_env_is_clean_and_expanded(driver: ProcessDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POINTSMAN_LEAK", "secret")
    # LC_CTYPE: Python itself sets it when it coerces the C locale (PEP 538), not the driver.
    script = "import os, json; print(json.dumps({k: v for k, v in os.environ.items() if k != 'LC_CTYPE'}))"
    s = spec(
        "envy", PY, "-c", script, "${PORT_HTTP}", env={"GREETING": "on ${HOST}:${PORT_HTTP}"}, ports={"http": 12345}
    )
    handle = await driver.start(s)
    assert (await asyncio.wait_for(driver.wait(handle), 5)).code == 0
    env = json.loads(driver.log_paths("envy")[0].read_text())
    assert env == {
        "PATH": os.environ["PATH"],
        "GREETING": "on 127.0.0.1:12345",
        "PORT_HTTP": "12345",
        "HOST": "127.0.0.1",
        "POINTSMAN_ALLOC_ID": "envy",
    }


def _port_for_task() -> int:
    # The task binds the port itself (as the scheduler hands it one), so the test cannot hold it
    # open: take one the kernel considers free. The only place in the tests that does this.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _http_get(port: int, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        writer.write(b"GET /hello.txt HTTP/1.0\r\nHost: test\r\n\r\n")
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
        return response


async def test_http_server_on_expanded_port(driver: ProcessDriver) -> None:
    port = _port_for_task()
    s = spec("web-1", PY, "-m", "http.server", "${PORT_HTTP}", "--bind", "${HOST}", ports={"http": port})
    handle = await driver.start(s)
    (driver.state_dir / "work" / "web-1" / "hello.txt").write_text("hello from the task dir")
    response = await _http_get(port)
    assert response.startswith(b"HTTP/1.0 200")
    assert response.endswith(b"hello from the task dir")
    result = await driver.stop(handle, grace=2)
    assert result.signal == signal.SIGTERM  # http.server keeps SIGTERM's default action
    assert result.reason == "stopped (killed by signal 15 (SIGTERM))"


async def test_stop_graceful_on_sigterm(driver: ProcessDriver) -> None:
    # "ready" only once the handler is in place: a SIGTERM before that would just kill it.
    script = (
        "import signal, sys, time\n"
        "def bye(*_): print('bye', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    handle = await driver.start(spec("polite", PY, "-c", script))
    await wait_for_log(driver.log_paths("polite")[0], "ready")
    started = time.monotonic()
    result = await driver.stop(handle, grace=5)
    assert time.monotonic() - started < 2
    assert (result.code, result.signal, result.reason) == (0, None, "stopped (exited 0)")
    assert driver.log_paths("polite")[0].read_text() == "ready\nbye\n"


async def test_stop_kills_after_grace_when_sigterm_ignored(driver: ProcessDriver) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + READY + "time.sleep(30)"
    handle = await driver.start(spec("stubborn", PY, "-c", script))
    await wait_for_log(driver.log_paths("stubborn")[0], "ready")
    started = time.monotonic()
    result = await driver.stop(handle, grace=0.5)
    assert 0.5 <= time.monotonic() - started < 3
    assert (result.code, result.signal) == (None, signal.SIGKILL)
    assert await driver.stop(handle) == result  # idempotent


async def test_stop_reaches_the_process_group(driver: ProcessDriver) -> None:
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(30)\n"
    )
    handle = await driver.start(spec("family", PY, "-c", script))
    content = await wait_for_log(driver.log_paths("family")[0], "\n")
    grandchild = int(content.strip())
    assert proc_starttime(grandchild) is not None
    await driver.stop(handle, grace=2)
    deadline = time.monotonic() + 3  # the grandchild is init's to reap once it dies
    while proc_starttime(grandchild) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert proc_starttime(grandchild) is None


# -- records, adoption, orphans ----------------------------------------------------------------


async def test_new_driver_adopts_running_task(driver: ProcessDriver) -> None:
    handle = await driver.start(spec("adopt-me", PY, "-c", READY + "import time; time.sleep(30)"))
    await wait_for_log(driver.log_paths("adopt-me")[0], "ready")

    restarted = ProcessDriver(driver.state_dir)  # what pointsman sees after a restart
    assert await restarted.running() == [handle]
    waiter = asyncio.ensure_future(restarted.wait(handle))
    await asyncio.sleep(0.15)
    assert not waiter.done()
    os.killpg(int(handle.ref.split(":")[0]), signal.SIGKILL)
    result = await asyncio.wait_for(waiter, 3)
    # Not its child: it sees the end but cannot know the status.
    assert (result.code, result.signal) == (None, None)
    assert "unknown" in result.reason
    assert await restarted.running() == []


async def test_adopted_task_can_be_stopped(driver: ProcessDriver) -> None:
    handle = await driver.start(spec("adopt-stop", PY, "-c", READY + "import time; time.sleep(30)"))
    await wait_for_log(driver.log_paths("adopt-stop")[0], "ready")
    restarted = ProcessDriver(driver.state_dir)
    result = await asyncio.wait_for(restarted.stop(handle, grace=2), 4)
    assert result.reason.startswith("stopped")
    assert (await asyncio.wait_for(driver.wait(handle), 2)).signal == signal.SIGTERM  # the real parent knows


async def test_cleanup_stops_orphans_only(driver: ProcessDriver) -> None:
    for alloc_id in ("a", "b", "c"):
        await driver.start(spec(alloc_id, PY, "-c", "import time; time.sleep(30)"))
    restarted = ProcessDriver(driver.state_dir)
    assert sorted(await restarted.cleanup(keep={"b", "z"})) == ["a", "c"]
    assert [h.alloc_id for h in await restarted.running()] == ["b"]


async def test_reused_pid_is_not_ours(driver: ProcessDriver) -> None:
    # A record whose pid is alive but started at another time: that pid was reused by someone
    # else (here: the test process itself). It must be neither reported nor signalled.
    (driver.state_dir / "tasks").mkdir(parents=True)
    record = {"alloc_id": "old", "pid": os.getpid(), "starttime": 1, "started_at": 0, "limits": "none", "cgroup": None}
    (driver.state_dir / "tasks" / "old.json").write_text(json.dumps(record))
    assert await driver.running() == []
    assert not (driver.state_dir / "tasks" / "old.json").exists()
    assert await driver.cleanup(keep=set()) == []


# -- limits ------------------------------------------------------------------------------------


async def test_limits_are_reported_as_they_are(driver: ProcessDriver) -> None:
    ok, why = await driver.available()
    assert ok
    handle = await driver.start(spec("lim", PY, "-c", "pass", cpu=0.25, memory=128 * 1024**2))
    await driver.wait(handle)
    if isinstance(driver.cgroups, CgroupV2):
        assert handle.limits == "cgroup v2 memory.max=134217728 cpu.max=25000 100000"
    elif isinstance(driver.cgroups, CgroupV1):
        swap = " memory.memsw.limit_in_bytes=134217728" if _swap_accounted() else ""
        assert handle.limits == f"cgroup v1 memory.limit_in_bytes=134217728{swap} cpu.cfs_quota_us=25000/100000"
    else:
        assert handle.limits.startswith("none: ")
        assert handle.limits in why


async def test_cgroup_join_before_exec_on_a_fake_hierarchy(tmp_path: Path) -> None:
    # A directory shaped like a cgroup v2 root: exercises the wrapper and the files written,
    # not the kernel (the kernel test is the OOM one below).
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "pointsman").mkdir()
    (root / "pointsman" / "cgroup.subtree_control").write_text("cpu")
    drv = ProcessDriver(tmp_path / "state", cgroup_root=root)
    handle = await drv.start(spec("fake", PY, "-c", "import os; print(os.getpid())", cpu=0.25, memory=64 * 1024**2))
    result = await asyncio.wait_for(drv.wait(handle), 5)
    assert result.code == 0
    assert handle.limits == "cgroup v2 memory.max=67108864 cpu.max=25000 100000"
    cgroup = root / "pointsman" / "fake"
    assert (cgroup / "memory.max").read_text() == "67108864"
    assert (cgroup / "cpu.max").read_text() == "25000 100000"
    assert (root / "cgroup.subtree_control").read_text() == "+memory +cpu"
    assert (root / "pointsman" / "cgroup.subtree_control").read_text() == "+memory"
    # The wrapper wrote its own pid, which exec kept for the real command.
    pid = handle.ref.split(":")[0]
    assert (cgroup / "cgroup.procs").read_text().strip() == pid
    assert drv.log_paths("fake")[0].read_text().strip() == pid


async def test_no_cgroups_means_no_limits(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    drv = ProcessDriver(tmp_path / "state", cgroup_root=missing)
    handle = await drv.start(spec("free", PY, "-c", "pass", memory=1024))
    await drv.wait(handle)
    assert drv.cgroups is None
    assert handle.limits == (
        f"none: no cgroup v2 hierarchy at {missing}; no cgroup v1 memory hierarchy at {missing / 'memory'}"
    )


def _real_cgroups() -> tuple[bool, str]:
    ok, why = CgroupV2(Path("/sys/fs/cgroup")).probe()
    return ok, why


def _real_cgroups_v1() -> tuple[bool, str]:
    """Usable only where v2 is not: the driver picks v2 first."""
    if _real_cgroups()[0]:
        return False, "this host has cgroup v2, which the driver prefers"
    return CgroupV1(Path("/sys/fs/cgroup")).probe()


def _swap_accounted() -> bool:
    return Path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()


async def test_memory_limit_is_enforced(driver: ProcessDriver) -> None:
    ok, why = _real_cgroups()
    if not ok:
        pytest.skip(f"cgroup v2 limits unavailable on this host: {why}")
    script = "data = b'x' * (200 * 1024 * 1024); print('survived', len(data))"
    handle = await driver.start(spec("hog", PY, "-c", script, memory=64 * 1024**2))
    assert handle.limits.startswith("cgroup v2 memory.max=67108864")
    result = await asyncio.wait_for(driver.wait(handle), 10)
    assert result.signal == signal.SIGKILL
    assert result.reason.startswith("oom-killed")
    assert "survived" not in driver.log_paths("hog")[0].read_text()


# -- cgroup v1 on the real kernel (legacy and hybrid hosts) ------------------------------------


@pytest.fixture
def v1_driver(driver: ProcessDriver) -> ProcessDriver:
    ok, why = _real_cgroups_v1()
    if not ok:
        pytest.skip(f"cgroup v1 limits unavailable on this host: {why}")
    assert isinstance(driver.cgroups, CgroupV1), driver.limits_status()
    return driver


async def test_v1_memory_limit_is_enforced(v1_driver: ProcessDriver) -> None:
    script = "data = b'x' * (200 * 1024 * 1024); print('survived', len(data))"
    handle = await v1_driver.start(spec("hog1", PY, "-c", script, memory=64 * 1024**2))
    assert handle.limits.startswith("cgroup v1 memory.limit_in_bytes=67108864")
    result = await asyncio.wait_for(v1_driver.wait(handle), 10)
    assert result.signal == signal.SIGKILL
    assert result.reason == "oom-killed (killed by signal 9 (SIGKILL))"
    assert "survived" not in v1_driver.log_paths("hog1")[0].read_text()
    assert not (Path("/sys/fs/cgroup/memory/pointsman") / "hog1").exists()


async def test_v1_under_the_limit_is_not_oom(v1_driver: ProcessDriver) -> None:
    # The counterpart: the same allocation with room for it exits normally, not "oom-killed".
    script = "data = b'x' * (20 * 1024 * 1024); print('survived', len(data))"
    handle = await v1_driver.start(spec("fits1", PY, "-c", script, memory=128 * 1024**2))
    result = await asyncio.wait_for(v1_driver.wait(handle), 10)
    assert result.reason == "exited 0"
    assert "survived 20971520" in v1_driver.log_paths("fits1")[0].read_text()


def _cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


async def test_v1_cpu_quota_is_enforced(v1_driver: ProcessDriver) -> None:
    script = READY + "import time\nend = time.monotonic() + 4\nwhile time.monotonic() < end: pass"
    handle = await v1_driver.start(spec("spin1", PY, "-c", script, cpu=0.2))
    await wait_for_log(v1_driver.log_paths("spin1")[0], "ready")
    pid = int(handle.ref.split(":")[0])
    cpu_cgroup = Path("/sys/fs/cgroup/cpu/pointsman/spin1")
    assert (cpu_cgroup / "cpu.cfs_quota_us").read_text().strip() == "20000"
    assert (cpu_cgroup / "cpu.cfs_period_us").read_text().strip() == str(CPU_PERIOD)
    throttled_before = _key_values(cpu_cgroup / "cpu.stat")["nr_throttled"]
    wall0, cpu0 = time.monotonic(), _cpu_seconds(pid)
    await asyncio.sleep(1.5)
    wall1, cpu1 = time.monotonic(), _cpu_seconds(pid)
    cores = (cpu1 - cpu0) / (wall1 - wall0)
    print(f"cpu=0.2 spinner used {cores:.3f} cores over {wall1 - wall0:.2f} s")
    # Unlimited, a busy loop uses a whole core; with the quota it gets about 0.2.
    assert 0.05 < cores < 0.35
    assert _key_values(cpu_cgroup / "cpu.stat")["nr_throttled"] > throttled_before
    await v1_driver.stop(handle, grace=1)
    assert not cpu_cgroup.exists()


def _key_values(path: Path) -> dict[str, int]:
    return {key: int(value) for key, value in (line.split() for line in path.read_text().splitlines())}


async def test_v1_limits_membership_and_removal(v1_driver: ProcessDriver) -> None:
    handle = await v1_driver.start(
        spec("lim1", PY, "-c", READY + "import time; time.sleep(30)", cpu=0.25, memory=128 * 1024**2)
    )
    await wait_for_log(v1_driver.log_paths("lim1")[0], "ready")
    memory_cgroup = Path("/sys/fs/cgroup/memory/pointsman/lim1")
    cpu_cgroup = Path("/sys/fs/cgroup/cpu/pointsman/lim1")
    swap = " memory.memsw.limit_in_bytes=134217728" if _swap_accounted() else ""
    assert handle.limits == f"cgroup v1 memory.limit_in_bytes=134217728{swap} cpu.cfs_quota_us=25000/100000"
    assert (memory_cgroup / "memory.limit_in_bytes").read_text().strip() == "134217728"
    if swap:
        assert (memory_cgroup / "memory.memsw.limit_in_bytes").read_text().strip() == "134217728"
    assert (cpu_cgroup / "cpu.cfs_quota_us").read_text().strip() == "25000"
    # The task itself (the wrapper's pid, kept by exec) is in both, and so is what it forks.
    pid = handle.ref.split(":")[0]
    assert (memory_cgroup / "cgroup.procs").read_text().split() == [pid]
    assert (cpu_cgroup / "cgroup.procs").read_text().split() == [pid]
    assert "memory:/pointsman/lim1" in Path(f"/proc/{pid}/cgroup").read_text()
    # Adoption keeps the limits text; stopping (here by the restarted driver) removes both cgroups.
    restarted = ProcessDriver(v1_driver.state_dir)
    assert await restarted.running() == [handle]
    await restarted.stop(handle, grace=1)
    assert not memory_cgroup.exists()
    assert not cpu_cgroup.exists()


async def test_v1_cgroups_of_an_escaped_child_are_emptied_and_removed(v1_driver: ProcessDriver) -> None:
    # A child that left the task's process group (setsid) is out of killpg's reach, not out of
    # the cgroup's: the cgroup is emptied and removed when the task ends.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
    )
    handle = await v1_driver.start(spec("escape1", PY, "-c", script, memory=256 * 1024**2))
    result = await asyncio.wait_for(v1_driver.wait(handle), 10)
    assert result.code == 0
    grandchild = int(v1_driver.log_paths("escape1")[0].read_text().strip())
    deadline = time.monotonic() + 3
    while proc_starttime(grandchild) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert proc_starttime(grandchild) is None
    assert not Path("/sys/fs/cgroup/memory/pointsman/escape1").exists()
    assert not Path("/sys/fs/cgroup/cpu/pointsman/escape1").exists()
