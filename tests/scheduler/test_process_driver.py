"""ProcessDriver with real processes: exit codes, signals, logs, env/port expansion, adoption
after a restart (a second driver on the same state dir), orphan cleanup and cgroup v2 limits."""

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

from scheduler.driver import DriverError, TaskSpec, expand, expand_spec, task_variables
from scheduler.drivers.process import CgroupV2, ProcessDriver, proc_starttime

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
    if driver.cgroups is not None and driver.cgroups.probe()[0]:
        assert handle.limits == "cgroup v2 memory.max=134217728 cpu.max=25000 100000"
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


async def test_no_cgroup_v2_means_no_limits(tmp_path: Path) -> None:
    drv = ProcessDriver(tmp_path / "state", cgroup_root=tmp_path / "missing")
    handle = await drv.start(spec("free", PY, "-c", "pass", memory=1024))
    await drv.wait(handle)
    assert handle.limits == f"none: no cgroup v2 hierarchy at {tmp_path / 'missing'}"


def _real_cgroups() -> tuple[bool, str]:
    ok, why = CgroupV2(Path("/sys/fs/cgroup")).probe()
    return ok, why


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
