"""Per-task cgroups: memory and CPU limits of the process driver's tasks, where the machine allows.

v2 (`CgroupV2`, a unified hierarchy with the memory and cpu controllers) when /sys/fs/cgroup is
one and writable, else v1 (`CgroupV1`, separate memory and cpu hierarchies, as on hybrid hosts),
else none: the driver then reports `none: <why>`. A task joins its cgroups before it execs (the
driver's wrapper writes its pid to each `cgroup.procs`); when it is over, `remove_cgroups` kills
what is left in them and removes them. `oom_killed` tells an OOM kill from other deaths.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from pathlib import Path

# cpu.max / cpu.cfs_period_us period in microseconds; the quota is cores * period.
CPU_PERIOD = 100_000
# How long a task's emptied cgroup may stay busy (exits still in progress) before it is left
# for the next cleanup.
CGROUP_REMOVE_TIMEOUT = 2.0


def _key_values(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file ("key value" per line) as a dict; empty when unreadable."""
    values: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(value)
    except OSError:
        pass
    return values


class _Hierarchy:
    """Probed once: whether per-task cgroups can be made here, and why not."""

    _probed: tuple[bool, str] | None = None

    def probe(self) -> tuple[bool, str]:
        if self._probed is None:
            self._probed = self._probe()
        return self._probed

    def _probe(self) -> tuple[bool, str]:  # pragma: no cover - interface
        raise NotImplementedError


class CgroupV2(_Hierarchy):
    """The `pointsman` subtree of a cgroup v2 hierarchy: probe once (enabling the controllers on
    the way), then one cgroup per task."""

    CONTROLLERS = ("memory", "cpu")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / "pointsman"

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

    def create(self, alloc_id: str, cpu: float, memory: int) -> tuple[list[Path], str]:
        """Make the task's cgroup with its limits; returns it (as a list) and the limits as text."""
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
        return [path], f"cgroup v2 memory.max={memory_max} cpu.max={cpu_max}"

    @staticmethod
    def oom_kills(path: Path) -> int:
        return _key_values(path / "memory.events").get("oom_kill", 0)


class CgroupV1(_Hierarchy):
    """The `pointsman` subtrees of the cgroup v1 memory and cpu hierarchies: probe once, then a
    cgroup in each per task (v1 hierarchies are separate trees: the task joins both)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.memory = root / "memory" / "pointsman"
        self.cpu = root / "cpu" / "pointsman"  # also right where "cpu" links to "cpu,cpuacct"

    def _probe(self) -> tuple[bool, str]:
        for base, marker in ((self.memory, "memory.limit_in_bytes"), (self.cpu, "cpu.cfs_quota_us")):
            if not (base.parent / marker).exists():
                return False, f"no cgroup v1 {base.parent.name} hierarchy at {base.parent}"
        try:
            for base in (self.memory, self.cpu):
                base.mkdir(exist_ok=True)
        except OSError as exc:
            return False, f"cgroup v1 not writable: {exc.strerror or exc} ({exc.filename})"
        return True, f"cgroup v1 at {self.memory} and {self.cpu}"

    def create(self, alloc_id: str, cpu: float, memory: int) -> tuple[list[Path], str]:
        """Make the task's memory and cpu cgroups with their limits; returns them and the text."""
        made: list[Path] = []
        try:
            memory_cgroup = self.memory / alloc_id
            memory_cgroup.mkdir(exist_ok=True)
            made.append(memory_cgroup)
            cpu_cgroup = self.cpu / alloc_id
            cpu_cgroup.mkdir(exist_ok=True)
            made.append(cpu_cgroup)

            limit = str(memory) if memory > 0 else "-1"  # -1: unlimited
            written = [f"memory.limit_in_bytes={limit}"]
            memsw = memory_cgroup / "memory.memsw.limit_in_bytes"  # only with swap accounting
            swap_accounted = memsw.exists()
            if swap_accounted:
                # memory+swap may never be set below memory: lift it first (a reused cgroup may
                # hold a smaller value), then set both to the limit, so swap cannot extend it.
                memsw.write_text("-1")
            (memory_cgroup / "memory.limit_in_bytes").write_text(limit)
            if swap_accounted and memory > 0:
                memsw.write_text(limit)
                written.append(f"memory.memsw.limit_in_bytes={limit}")

            quota = str(max(1000, int(cpu * CPU_PERIOD))) if cpu > 0 else "-1"
            (cpu_cgroup / "cpu.cfs_period_us").write_text(str(CPU_PERIOD))
            (cpu_cgroup / "cpu.cfs_quota_us").write_text(quota)
            written.append(f"cpu.cfs_quota_us={quota}/{CPU_PERIOD}")
        except OSError:
            for path in made:
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        return made, "cgroup v1 " + " ".join(written)

    @staticmethod
    def oom_killed(path: Path, sig: int | None) -> bool:
        """Whether the kernel OOM-killed in this memory cgroup."""
        control = _key_values(path / "memory.oom_control")
        if "oom_kill" in control:  # Linux 4.13+
            return control["oom_kill"] > 0
        if control.get("under_oom", 0) > 0:
            return True
        # Older kernels do not count kills: a SIGKILLed task that hit its limit is the best guess.
        try:
            failcnt = int((path / "memory.failcnt").read_text())
        except (OSError, ValueError):
            failcnt = 0
        return sig == signal.SIGKILL and failcnt > 0


def oom_killed(cgroups: list[Path], sig: int | None) -> bool:
    for path in cgroups:
        if (path / "memory.events").exists():
            return CgroupV2.oom_kills(path) > 0
        if (path / "memory.oom_control").exists():
            return CgroupV1.oom_killed(path, sig)
    return False


def _empty_cgroup(path: Path) -> None:
    """Kill whatever is still in a cgroup of a task that is over (even processes that left its
    process group with setsid). v2 has cgroup.kill (Linux 5.14+); otherwise each listed pid gets
    SIGKILL: a pid listed there is a member at that instant, and being a member keeps the pid
    from being reused."""
    kill = path / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
        return
    try:
        pids = [int(pid) for pid in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


async def remove_cgroups(paths: list[Path], timeout: float = CGROUP_REMOVE_TIMEOUT) -> list[Path]:
    """Empty and rmdir each cgroup (their files are virtual), retrying while the kernel finishes
    the killed processes' exits (rmdir says EBUSY until then). Returns the cgroups that stayed:
    they are left for the next cleanup."""
    deadline = time.monotonic() + timeout
    left = list(paths)
    while True:
        busy = []
        for path in left:
            _empty_cgroup(path)
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    busy.append(path)  # members still exiting: try again
        left = busy
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(0.02)
