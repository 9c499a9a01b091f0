"""ProcessDriver: runs a task as a host process in its own session, limited by cgroup v2 when it can.

Layout under `state_dir`:

    logs/<alloc_id>.stdout, logs/<alloc_id>.stderr   appended to, across restarts of the task
    tasks/<alloc_id>.json                             {pid, starttime, ...}: what adoption trusts
    work/<alloc_id>/                                   the task's working directory

A pid alone is not an identity: after the task ends the kernel may hand the pid to something
else. The record keeps the process start time (field 22 of /proc/<pid>/stat, in clock ticks
since boot); a pid whose start time differs is someone else's and is never signalled.

Every task is the leader of a new session (and so of a process group whose id is its pid), so
`killpg` reaches the children it forked too.

Limits. Where /sys/fs/cgroup is a writable cgroup v2 hierarchy offering the memory and cpu
controllers, each task gets `/sys/fs/cgroup/pointsman/<alloc_id>` with memory.max and cpu.max.
The task joins its cgroup *before* it execs: the driver starts `/bin/sh -c 'echo $$ >
.../cgroup.procs && exec "$@"'`, so there is no window in which the real command runs (and could
fork, or allocate) outside its limits, which moving the pid in after start would leave. `exec`
keeps the pid and the start time, so the record stays right. Where that hierarchy is missing
(cgroup v1 or hybrid hosts, read-only /sys) the task runs without limits and `TaskHandle.limits`
says so: reported, not faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.driver import Driver, DriverError, TaskExit, TaskHandle, TaskSpec, expand_spec

# cpu.max period in microseconds; the quota is cores * period.
CPU_PERIOD = 100_000
# How often an adopted task (not our child, so nothing to await) is looked for in /proc.
POLL_INTERVAL = 0.1
_ALLOC_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# The wrapper that joins the cgroup, then becomes the task. $0 is the cgroup.procs path.
_JOIN_CGROUP = 'echo $$ > "$0" || { echo "pointsman: cannot join cgroup $0" >&2; exit 125; }; exec "$@"'


def proc_starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live process, None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) is in parentheses and may itself contain spaces or ')': split after the last.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, starttime = fields[0], fields[19]  # fields 3 and 22 of proc(5)
    if state in ("Z", "X", "x"):
        return None
    return int(starttime)


def _describe(code: int | None, sig: int | None) -> str:
    if sig is not None:
        try:
            return f"killed by signal {sig} ({signal.Signals(sig).name})"
        except ValueError:
            return f"killed by signal {sig}"
    if code is not None:
        return f"exited {code}"
    return "ended (exit status unknown: not our child)"


class CgroupV2:
    """The `pointsman` subtree of a cgroup v2 hierarchy: probe once, then one cgroup per task."""

    CONTROLLERS = ("memory", "cpu")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / "pointsman"
        self._probed: tuple[bool, str] | None = None

    def probe(self) -> tuple[bool, str]:
        """Whether per-task cgroups can be made, and why not. Enables the controllers on the way."""
        if self._probed is None:
            self._probed = self._probe()
        return self._probed

    def _probe(self) -> tuple[bool, str]:
        controllers_file = self.root / "cgroup.controllers"
        if not controllers_file.exists():
            return False, f"no cgroup v2 hierarchy at {self.root}"
        try:
            available = set(controllers_file.read_text().split())
            missing = [c for c in self.CONTROLLERS if c not in available]
            if missing:
                return False, f"cgroup v2 at {self.root} lacks controllers {', '.join(missing)}"
            self.base.mkdir(exist_ok=True)
            # Children get a controller only if every ancestor's subtree_control enables it.
            for parent in (self.root, self.base):
                self._enable(parent)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                # cgroup v2 "no internal processes": a non-root cgroup that holds processes (a
                # container's namespaced root, typically) cannot hand controllers to children.
                return False, f"cannot enable controllers below {self.root}: it holds processes itself"
            return False, f"cgroups not writable: {exc.strerror or exc} ({self.root})"
        return True, f"cgroup v2 at {self.base}"

    def _enable(self, cgroup: Path) -> None:
        control = cgroup / "cgroup.subtree_control"
        enabled = set(control.read_text().split())
        wanted = [c for c in self.CONTROLLERS if c not in enabled]
        if wanted:
            control.write_text(" ".join(f"+{c}" for c in wanted))

    def create(self, alloc_id: str, cpu: float, memory: int) -> tuple[Path, str]:
        """Make the task's cgroup with its limits; returns it and the limits as text."""
        path = self.base / alloc_id
        path.mkdir(exist_ok=True)
        memory_max = str(memory) if memory > 0 else "max"
        cpu_max = f"{max(1000, int(cpu * CPU_PERIOD))} {CPU_PERIOD}" if cpu > 0 else f"max {CPU_PERIOD}"
        (path / "memory.max").write_text(memory_max)
        (path / "cpu.max").write_text(cpu_max)
        # Without this a task over memory.max swaps instead of being OOM-killed.
        swap = path / "memory.swap.max"
        if memory > 0 and swap.exists():
            with contextlib.suppress(OSError):
                swap.write_text("0")
        return path, f"cgroup v2 memory.max={memory_max} cpu.max={cpu_max}"

    @staticmethod
    def oom_kills(path: Path) -> int:
        try:
            for line in (path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    @staticmethod
    def remove(path: Path) -> None:
        # The task is over: whatever it left behind in its cgroup (even processes that escaped
        # its process group with setsid) is killed; cgroup.kill exists from Linux 5.14. Then the
        # directory goes with rmdir (its files are virtual); that fails while a process is still
        # inside, in which case it stays for the next cleanup.
        kill = path / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        with contextlib.suppress(OSError):
            path.rmdir()


@dataclass
class _Child:
    """A task this driver instance started: the asyncio process to await."""

    process: asyncio.subprocess.Process
    starttime: int


class ProcessDriver(Driver):
    name = "process"

    def __init__(self, state_dir: Path, cgroup_root: Path | None = Path("/sys/fs/cgroup")) -> None:
        self.state_dir = Path(state_dir)
        self.cgroups = CgroupV2(cgroup_root) if cgroup_root is not None else None
        self._children: dict[str, _Child] = {}
        self._exits: dict[str, TaskExit] = {}
        self._stopping: set[str] = set()

    # -- paths and records -------------------------------------------------------------------

    def log_paths(self, alloc_id: str) -> tuple[Path, Path]:
        logs = self.state_dir / "logs"
        return logs / f"{alloc_id}.stdout", logs / f"{alloc_id}.stderr"

    def _record_path(self, alloc_id: str) -> Path:
        return self.state_dir / "tasks" / f"{alloc_id}.json"

    def _read_record(self, alloc_id: str) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(self._record_path(alloc_id).read_text())
        except (OSError, ValueError):
            return None
        return record

    def _write_record(self, alloc_id: str, record: dict[str, Any]) -> None:
        path = self._record_path(alloc_id)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)  # atomic: a crash never leaves half a record

    def limits_status(self) -> str:
        if self.cgroups is None:
            return "none: cgroups disabled"
        ok, why = self.cgroups.probe()
        return why if ok else f"none: {why}"

    # -- the contract ------------------------------------------------------------------------

    async def available(self) -> tuple[bool, str]:
        return True, f"host processes; limits: {self.limits_status()}"

    async def start(self, spec: TaskSpec) -> TaskHandle:
        if not _ALLOC_ID_RE.match(spec.alloc_id):
            raise DriverError(f"alloc id {spec.alloc_id!r} is not usable as a file name")
        if not spec.command:
            raise DriverError(f"{spec.alloc_id}: empty command")
        child = self._children.get(spec.alloc_id)
        if (child is not None and child.process.returncode is None) or record_alive(self._read_record(spec.alloc_id)):
            raise DriverError(f"{spec.alloc_id}: a task is already running for this allocation")
        command, task_env = expand_spec(spec)
        env = {"PATH": os.environ["PATH"]} if "PATH" in os.environ else {}
        env.update(task_env)
        executable = shutil.which(command[0], path=env.get("PATH"))
        if executable is None:
            raise DriverError(f"{spec.alloc_id}: command not found: {command[0]!r}")

        for sub in ("logs", "tasks", "work"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        workdir = self.state_dir / "work" / spec.alloc_id
        workdir.mkdir(exist_ok=True)

        argv: tuple[str, ...] = (executable, *command[1:])
        cgroup: Path | None = None
        limits = self.limits_status()
        if self.cgroups is not None and self.cgroups.probe()[0]:
            try:
                cgroup, limits = self.cgroups.create(spec.alloc_id, spec.cpu, spec.memory)
            except OSError as exc:
                limits = f"none: cannot create cgroup for {spec.alloc_id}: {exc.strerror or exc}"
            else:
                argv = ("/bin/sh", "-c", _JOIN_CGROUP, str(cgroup / "cgroup.procs"), *argv)

        stdout_path, stderr_path = self.log_paths(spec.alloc_id)
        with open(stdout_path, "ab") as out, open(stderr_path, "ab") as err:
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=env,
                    cwd=workdir,
                    start_new_session=True,  # own session and process group: killpg reaches its children
                )
            except OSError as exc:
                if cgroup is not None:
                    CgroupV2.remove(cgroup)
                raise DriverError(f"{spec.alloc_id}: cannot start {command[0]!r}: {exc}") from exc
        started_at = time.time()
        starttime = proc_starttime(process.pid)
        if starttime is None:  # already gone (and reaped): still a task that ran and ended
            starttime = 0
        self._children[spec.alloc_id] = _Child(process, starttime)
        self._exits.pop(spec.alloc_id, None)
        handle = TaskHandle(spec.alloc_id, self.name, f"{process.pid}:{starttime}", started_at, limits)
        self._write_record(
            spec.alloc_id,
            {
                "alloc_id": spec.alloc_id,
                "job": spec.job,
                "pid": process.pid,
                "starttime": starttime,
                "started_at": started_at,
                "limits": limits,
                "cgroup": str(cgroup) if cgroup is not None else None,
                "command": list(command),
            },
        )
        return handle

    async def wait(self, handle: TaskHandle) -> TaskExit:
        alloc_id = handle.alloc_id
        if alloc_id in self._exits:
            return self._exits[alloc_id]
        pid, starttime = _parse_ref(handle.ref)
        child = self._children.get(alloc_id)
        code: int | None = None
        sig: int | None = None
        if child is not None and child.process.pid == pid:
            returncode = await child.process.wait()
            if returncode < 0:
                sig = -returncode
            else:
                code = returncode
        else:
            # Adopted (started before a restart): not our child, so no exit status to collect.
            while proc_starttime(pid) == starttime:
                await asyncio.sleep(POLL_INTERVAL)
        return self._finish(alloc_id, code, sig)

    def _finish(self, alloc_id: str, code: int | None, sig: int | None) -> TaskExit:
        """Record how the task ended (first caller wins), drop its record and cgroup."""
        if alloc_id in self._exits:
            return self._exits[alloc_id]
        reason = _describe(code, sig)
        record = self._read_record(alloc_id)
        cgroup = Path(record["cgroup"]) if record and record.get("cgroup") else None
        if cgroup is not None and CgroupV2.oom_kills(cgroup) > 0:
            reason = f"oom-killed ({reason})"
        if alloc_id in self._stopping:
            reason = f"stopped ({reason})"
        exit_ = TaskExit(alloc_id, code, sig, time.time(), reason)
        self._exits[alloc_id] = exit_
        self._children.pop(alloc_id, None)
        self._stopping.discard(alloc_id)
        if cgroup is not None:
            CgroupV2.remove(cgroup)
        with contextlib.suppress(FileNotFoundError):
            self._record_path(alloc_id).unlink()
        return exit_

    async def stop(self, handle: TaskHandle, grace: float = 5.0) -> TaskExit:
        alloc_id = handle.alloc_id
        if alloc_id in self._exits:
            return self._exits[alloc_id]
        pid, starttime = _parse_ref(handle.ref)
        child = self._children.get(alloc_id)
        # Our child: asyncio knows whether it ended. Adopted: only a pid with the recorded start
        # time is still ours to signal.
        alive = child.process.returncode is None if child is not None else proc_starttime(pid) == starttime
        if not alive:
            return await self.wait(handle)  # already over, or the pid now belongs to someone else
        self._stopping.add(alloc_id)
        waiter = asyncio.ensure_future(self.wait(handle))
        try:
            _killpg(pid, signal.SIGTERM)
            done, _ = await asyncio.wait({waiter}, timeout=grace)
            if not done:
                _killpg(pid, signal.SIGKILL)
            exit_ = await waiter
        finally:
            if not waiter.done():
                waiter.cancel()
        # The leader is gone; children that ignored SIGTERM (or were orphaned) die with the group.
        # A process group id cannot be reused while any member lives, so this reaches only ours
        # (were the group already empty, the id would have to be reused by a new group leader
        # within these microseconds).
        _killpg(pid, signal.SIGKILL)
        return exit_

    async def running(self) -> list[TaskHandle]:
        handles = []
        tasks = self.state_dir / "tasks"
        for path in sorted(tasks.glob("*.json")) if tasks.is_dir() else []:
            record = self._read_record(path.stem)
            if record is None:
                continue
            if not record_alive(record):
                if record["alloc_id"] in self._children:
                    continue  # our child, ended: wait() collects its status and cleans up
                # Ended while nobody watched: forget it (and its cgroup, if any).
                if record.get("cgroup"):
                    CgroupV2.remove(Path(record["cgroup"]))
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            handles.append(
                TaskHandle(
                    alloc_id=record["alloc_id"],
                    driver=self.name,
                    ref=f"{record['pid']}:{record['starttime']}",
                    started_at=record["started_at"],
                    limits=record["limits"],
                )
            )
        return handles

    async def cleanup(self, keep: set[str]) -> list[str]:
        orphans = [handle for handle in await self.running() if handle.alloc_id not in keep]
        await asyncio.gather(*(self.stop(handle, grace=2.0) for handle in orphans))
        return [handle.alloc_id for handle in orphans]


def record_alive(record: dict[str, Any] | None) -> bool:
    """Whether a task record's process is still the one alive under its pid."""
    if not record:
        return False
    return proc_starttime(int(record["pid"])) == int(record["starttime"])


def _parse_ref(ref: str) -> tuple[int, int]:
    try:
        pid, starttime = ref.split(":")
        return int(pid), int(starttime)
    except ValueError:
        raise DriverError(f"not a process task reference (pid:starttime): {ref!r}") from None


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
