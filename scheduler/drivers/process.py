"""ProcessDriver: runs a task as a host process in its own session, limited by cgroups when it can.

Layout under `state_dir`:

    logs/<alloc_id>.stdout, logs/<alloc_id>.stderr   appended to, across restarts of the task
    tasks/<alloc_id>.json                             {pid, starttime, ...}: what adoption trusts
    work/<alloc_id>/                                   the task's working directory
    netns/leases/<address>.json                        network "namespace" tasks (scheduler/netns.py)

A pid alone is not an identity: after the task ends the kernel may hand the pid to something
else. The record keeps the process start time (field 22 of /proc/<pid>/stat, in clock ticks
since boot); a pid whose start time differs is someone else's and is never signalled.

Every task is the leader of a new session (and so of a process group whose id is its pid), so
`killpg` reaches the children it forked too.

Limits (the hierarchies themselves are `scheduler/cgroups.py`). The first usable of:

- cgroup v2: /sys/fs/cgroup is a writable v2 hierarchy offering the memory and cpu controllers.
  Each task gets `/sys/fs/cgroup/pointsman/<alloc_id>` with memory.max (and memory.swap.max=0)
  and cpu.max; OOM kills are counted in memory.events.
- cgroup v1 (legacy or hybrid hosts): writable v1 hierarchies at /sys/fs/cgroup/memory and
  /sys/fs/cgroup/cpu. Each task gets `memory/pointsman/<alloc_id>` with memory.limit_in_bytes
  (and memory.memsw.limit_in_bytes at the same value where swap accounting exists, so swap does
  not bypass the limit) and `cpu/pointsman/<alloc_id>` with cpu.cfs_period_us/cpu.cfs_quota_us.
  OOM kills: `oom_kill N` of memory.oom_control (Linux 4.13+); on older kernels, memory.under_oom
  or a SIGKILLed task whose memory.failcnt shows it hit the limit.

The task joins its cgroups *before* it execs: the driver starts `/bin/sh -c 'echo $$ >
<each>/cgroup.procs; exec "$@"'`, so there is no window in which the real command runs (and
could fork, or allocate) outside its limits, which moving the pid in after start would leave.
`exec` keeps the pid and the start time, so the record stays right. With neither hierarchy
usable (no cgroups, read-only /sys, not root) the task runs without limits and
`TaskHandle.limits` says so: reported, not faked. When the task is over its cgroups are
emptied (whatever escaped its process group is killed) and removed, retrying briefly while the
kernel finishes the exits.

Network. `TaskSpec.network == "namespace"` gives the task a network namespace of its own on the
pointsman bridge (scheduler/netns.py): it is built before the start, the command runs through
`ip netns exec <ns>` (after the cgroup join; `ip` execs the command, keeping the pid), `${HOST}`
is the instance's address and `TaskHandle.address` reports it. Namespace, veth, resolv.conf and
address lease go when the task ends, is stopped or cleaned up. "host" (the default) changes
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scheduler.cgroups import CgroupV1, CgroupV2, oom_killed, remove_cgroups
from scheduler.driver import Driver, DriverError, TaskExit, TaskHandle, TaskSpec, expand_spec
from scheduler.netns import Lease, NetworkNamespaces

# How often an adopted task (not our child, so nothing to await) is looked for in /proc.
POLL_INTERVAL = 0.1
NETWORKS = ("host", "namespace")
_ALLOC_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# The wrapper that joins the cgroups, then becomes the task. Its arguments are the cgroup.procs
# files to write its pid to, "--", then the command; $0 is only a name for `ps`.
_JOIN_CGROUPS = (
    'for f; do shift; [ "$f" = -- ] && break; '
    'echo $$ > "$f" || { echo "pointsman: cannot join cgroup $f" >&2; exit 125; }; done; exec "$@"'
)


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


def _record_cgroups(record: dict[str, Any] | None) -> list[Path]:
    if not record:
        return []
    paths = record.get("cgroups")
    if paths is None:  # a record written before v1 support: one v2 cgroup or none
        paths = [record["cgroup"]] if record.get("cgroup") else []
    return [Path(path) for path in paths]


class _Spawned:
    """A child started with `subprocess.Popen` and awaited through a pidfd.

    Not `asyncio.create_subprocess_exec`: under uvloop that spawns through libuv, which hands
    the child duplicates of pointsman's own stdio and internal pipes (measured: fds 10-21 and
    251 in every child). A task holding a copy of the pipe on pointsman's stdout keeps that
    pipe open for as long as it lives, so `pointsman up | tee log` would never see the end.
    Popen closes every descriptor but 0-2 (close_fds).
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    async def wait(self) -> int:
        code = self.popen.poll()
        if code is not None:
            return code
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # no pidfd (kernel < 5.3): poll
            while (code := self.popen.poll()) is None:
                await asyncio.sleep(POLL_INTERVAL)
            return code
        try:
            while (code := self.popen.poll()) is None:
                readable: asyncio.Future[None] = loop.create_future()
                loop.add_reader(pidfd, _resolve, readable)
                try:
                    await readable
                finally:
                    loop.remove_reader(pidfd)
            return code
        finally:
            os.close(pidfd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class _Child:
    """A task this driver instance started: the process to await."""

    process: _Spawned
    starttime: int


class ProcessDriver(Driver):
    name = "process"

    def __init__(
        self,
        state_dir: Path,
        cgroup_root: Path | None = Path("/sys/fs/cgroup"),
        network: NetworkNamespaces | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.cgroup_root = cgroup_root
        self._cgroups: CgroupV2 | CgroupV1 | None = None
        self._cgroups_status: str | None = None
        # Namespaces are made only for tasks that ask; the default manager has no side effects.
        self.network = network if network is not None else NetworkNamespaces(self.state_dir / "netns")
        self._children: dict[str, _Child] = {}
        self._exits: dict[str, TaskExit] = {}
        self._finishing: dict[str, asyncio.Future[TaskExit]] = {}
        self._stopping: set[str] = set()
        self._starting: set[str] = set()

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

    # -- limits ------------------------------------------------------------------------------

    @property
    def cgroups(self) -> CgroupV2 | CgroupV1 | None:
        """The cgroup flavour in use: v2 if usable, else v1, else None (see `limits_status`)."""
        self.limits_status()
        return self._cgroups

    def limits_status(self) -> str:
        """What the probe found, once: the hierarchy in use, or "none: <why neither works>"."""
        if self._cgroups_status is None:
            if self.cgroup_root is None:
                self._cgroups_status = "none: cgroups disabled"
            else:
                reasons = []
                for backend in (CgroupV2(self.cgroup_root), CgroupV1(self.cgroup_root)):
                    ok, why = backend.probe()
                    if ok:
                        self._cgroups, self._cgroups_status = backend, why
                        break
                    reasons.append(why)
                else:
                    self._cgroups_status = "none: " + "; ".join(reasons)
        return self._cgroups_status

    # -- the contract ------------------------------------------------------------------------

    async def available(self) -> tuple[bool, str]:
        ok, network = self.network.available()
        networks = "host and namespace" if ok else f"host only ({network})"
        return True, f"host processes; limits: {self.limits_status()}; networks: {networks}"

    async def start(self, spec: TaskSpec) -> TaskHandle:
        if not _ALLOC_ID_RE.match(spec.alloc_id):
            raise DriverError(f"alloc id {spec.alloc_id!r} is not usable as a file name")
        if not spec.command:
            raise DriverError(f"{spec.alloc_id}: empty command")
        if spec.network not in NETWORKS:
            raise DriverError(f"{spec.alloc_id}: network {spec.network!r}: expected one of {', '.join(NETWORKS)}")
        if spec.network == "namespace":
            ok, why = self.network.available()
            if not ok:
                raise DriverError(f"{spec.alloc_id}: {why}")
        finishing = self._finishing.get(spec.alloc_id)
        if finishing is not None:  # the previous task's teardown first: it must not hit the new one
            await asyncio.shield(finishing)
        child = self._children.get(spec.alloc_id)
        if (
            spec.alloc_id in self._starting
            or (child is not None and child.process.returncode is None)
            or record_alive(self._read_record(spec.alloc_id))
        ):
            raise DriverError(f"{spec.alloc_id}: a task is already running for this allocation")
        command, _ = expand_spec(spec)  # every reference checked before anything is made
        path = os.environ.get("PATH")
        executable = shutil.which(command[0], path=path)
        if executable is None:
            raise DriverError(f"{spec.alloc_id}: command not found: {command[0]!r}")
        self._starting.add(spec.alloc_id)
        try:
            return await self._start(spec, executable)
        finally:
            self._starting.discard(spec.alloc_id)

    async def _start(self, spec: TaskSpec, executable: str) -> TaskHandle:
        for sub in ("logs", "tasks", "work"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        workdir = self.state_dir / "work" / spec.alloc_id
        workdir.mkdir(exist_ok=True)

        lease: Lease | None = None
        cgroups: list[Path] = []
        try:
            if spec.network == "namespace":
                lease = await self.network.setup(spec.alloc_id, spec.dns)
                spec = dataclasses.replace(spec, host=lease.address)  # ${HOST}: its own address
            command, task_env = expand_spec(spec)
            env = {"PATH": os.environ["PATH"]} if "PATH" in os.environ else {}
            env.update(task_env)

            argv: tuple[str, ...] = (executable, *command[1:])
            if lease is not None:
                argv = (*self.network.exec_prefix(lease), *argv)
            limits = self.limits_status()
            backend = self.cgroups
            if backend is not None:
                try:
                    cgroups, limits = backend.create(spec.alloc_id, spec.cpu, spec.memory)
                except OSError as exc:
                    limits = f"none: cannot create cgroup for {spec.alloc_id}: {exc.strerror or exc}"
                else:
                    procs = [str(cgroup / "cgroup.procs") for cgroup in cgroups]
                    # The shell exports PWD, which the task's environment did not have.
                    script = _JOIN_CGROUPS if "PWD" in env else "unset PWD; " + _JOIN_CGROUPS
                    argv = ("/bin/sh", "-c", script, "pointsman-join", *procs, "--", *argv)

            stdout_path, stderr_path = self.log_paths(spec.alloc_id)
            with open(stdout_path, "ab") as out, open(stderr_path, "ab") as err:
                try:
                    process = _Spawned(
                        subprocess.Popen(
                            argv,
                            stdin=subprocess.DEVNULL,
                            stdout=out,
                            stderr=err,
                            env=env,
                            cwd=workdir,
                            close_fds=True,
                            start_new_session=True,  # own session and process group: killpg reaches its children
                        )
                    )
                except OSError as exc:
                    raise DriverError(f"{spec.alloc_id}: cannot start {command[0]!r}: {exc}") from exc
        except BaseException:
            await remove_cgroups(cgroups)
            if lease is not None:
                await self.network.release(spec.alloc_id)
            raise
        started_at = time.time()
        starttime = proc_starttime(process.pid)
        if starttime is None:  # already gone (and reaped): still a task that ran and ended
            starttime = 0
        self._children[spec.alloc_id] = _Child(process, starttime)
        self._exits.pop(spec.alloc_id, None)
        address = lease.address if lease is not None else None
        handle = TaskHandle(spec.alloc_id, self.name, f"{process.pid}:{starttime}", started_at, limits, address)
        self._write_record(
            spec.alloc_id,
            {
                "alloc_id": spec.alloc_id,
                "job": spec.job,
                "pid": process.pid,
                "starttime": starttime,
                "started_at": started_at,
                "limits": limits,
                "cgroups": [str(cgroup) for cgroup in cgroups],
                "network": spec.network,
                "netns": lease.netns if lease is not None else None,
                "address": address,
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
        return await self._finish(alloc_id, code, sig)

    async def _finish(self, alloc_id: str, code: int | None, sig: int | None) -> TaskExit:
        """Record how the task ended and release what it held. The first caller's status wins;
        every caller returns only once the teardown is done (so after stop() nothing is left)."""
        pending = self._finishing.get(alloc_id)
        if pending is None:
            if alloc_id in self._exits:
                return self._exits[alloc_id]
            pending = asyncio.ensure_future(self._release(alloc_id, code, sig))
            self._finishing[alloc_id] = pending
            pending.add_done_callback(lambda _: self._finishing.pop(alloc_id, None))
        # Shielded: a caller that gives up (a cancelled wait) must not cut the teardown short.
        return await asyncio.shield(pending)

    async def _release(self, alloc_id: str, code: int | None, sig: int | None) -> TaskExit:
        reason = _describe(code, sig)
        record = self._read_record(alloc_id)
        if oom_killed(_record_cgroups(record), sig):
            reason = f"oom-killed ({reason})"
        if alloc_id in self._stopping:
            reason = f"stopped ({reason})"
        exit_ = TaskExit(alloc_id, code, sig, time.time(), reason)
        try:
            await self._teardown(alloc_id, record)
        finally:
            self._exits[alloc_id] = exit_
            self._children.pop(alloc_id, None)
            self._stopping.discard(alloc_id)
            with contextlib.suppress(FileNotFoundError):
                self._record_path(alloc_id).unlink()
        return exit_

    async def _teardown(self, alloc_id: str, record: dict[str, Any] | None) -> None:
        """Cgroups first (that kills what is left of the task), then its network namespace."""
        await remove_cgroups(_record_cgroups(record))
        await self.network.release(alloc_id)  # a no-op without a lease

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
            alloc_id = record["alloc_id"]
            if not record_alive(record):
                if alloc_id in self._children or alloc_id in self._finishing:
                    continue  # our child, ended: wait() collects its status and cleans up
                # Ended while nobody watched: forget it (its cgroups and namespace too).
                await self._teardown(alloc_id, record)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            handles.append(
                TaskHandle(
                    alloc_id=alloc_id,
                    driver=self.name,
                    ref=f"{record['pid']}:{record['starttime']}",
                    started_at=record["started_at"],
                    limits=record["limits"],
                    address=record.get("address"),
                )
            )
        return handles

    async def cleanup(self, keep: set[str]) -> list[str]:
        orphans = [handle for handle in await self.running() if handle.alloc_id not in keep]
        await asyncio.gather(*(self.stop(handle, grace=2.0) for handle in orphans))
        # Leases without a task (a crash between making the namespace and starting the task).
        live = {handle.alloc_id for handle in await self.running()}
        busy = live | keep | self._starting | set(self._children) | set(self._finishing)
        for lease in self.network.leases():
            if lease.alloc_id not in busy:
                await self.network.release(lease.alloc_id)
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
