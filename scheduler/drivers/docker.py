"""The docker driver: one container per allocation, through the Docker engine's API (docker SDK).

The SDK is blocking; every call runs in `asyncio.to_thread`. The engine is the source of truth:
a container is ours when it carries the label `pointsman.owned=<owner>` (a digest of the driver's
state directory: one pointsman's containers are never another's), its allocation is the label
`pointsman.alloc`, its name is `pointsman-<alloc_id>`. So a second driver (pointsman restarted)
finds and adopts the running containers with `running()`.

- Images are not pulled: the image must exist locally (a missing image is a `DriverError`).
- Ports: each `spec.ports` value is published on `spec.host` (127.0.0.1 by default) with the
  same number inside the container (host port = container port). Inside the container the task
  must listen on all interfaces, so `${HOST}` expands to `0.0.0.0` in the command and
  environment (the container's own loopback is not reachable through a published port).
- Limits: `mem_limit=spec.memory` (0 = none), `nano_cpus=cpu*1e9`; `TaskHandle.limits` reports
  what the engine recorded for the container (HostConfig), not what was asked.
- `init=True`: docker-init is PID 1 and forwards SIGTERM to the task on `stop`.
- Logs stay in the engine while the container exists; when a task ends (`wait` returns) or is
  stopped, its stdout and stderr are written to `<state_dir>/logs/<alloc_id>.stdout` / `.stderr`
  (the process driver's layout), which is what `log_paths` returns; the files do not exist
  while the task still runs. The exit is recorded in `<state_dir>/exits/<alloc_id>.json` so
  that `stop` stays idempotent after the container is removed.
- Exit codes: the engine reports only a code; 128+N with N a signal number is reported as
  killed by signal N (docker-init exits that way when its child is killed), which a task that
  itself exits 137 cannot be told apart from. An OOM kill (State.OOMKilled) is "oom-killed".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import signal as signal_module
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions

from scheduler.driver import Driver, DriverError, TaskExit, TaskHandle, TaskSpec, expand_spec

OWNED_LABEL = "pointsman.owned"
ALLOC_LABEL = "pointsman.alloc"
JOB_LABEL = "pointsman.job"
NAME_PREFIX = "pointsman-"
# Docker container names are [a-zA-Z0-9][a-zA-Z0-9_.-]*; the id also names files in state_dir.
_ALLOC_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# How long one blocking `wait` request may hang before we ask again (the SDK's HTTP timeout);
# also how long a cancelled or closed wait may keep its thread.
_WAIT_CHUNK = 10.0
# Each pending `wait` holds a thread and an HTTP connection for as long as its task runs. The
# threads are its own daemon threads: in asyncio's default executor (min(32, cores + 4) threads)
# a handful of waits would starve every other blocking call (start, stop, the rest of pointsman's
# to_thread users), and an executor's threads are joined at exit, which a wait never returning
# would block. MAX_WAITS sizes the HTTP connection pool, not a limit.
MAX_WAITS = 256


def _parse_time(value: Any) -> float | None:
    """Docker's RFC 3339 times with nanoseconds -> epoch seconds; None for unset/zero times."""
    if not isinstance(value, str) or not value or value.startswith("0001-"):
        return None
    text = value.replace("Z", "+00:00")
    if "." in text:
        head, _, tail = text.partition(".")
        digits = "".join(ch for ch in tail if ch.isdigit())
        zone = tail[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary file of this thread's own (wait and stop may save the same logs)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _signal_name(number: int) -> str:
    try:
        return signal_module.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exit_from_state(alloc_id: str, state: dict[str, Any], stopped: bool = False) -> TaskExit:
    code = state.get("ExitCode")
    at = _parse_time(state.get("FinishedAt")) or time.time()
    if not isinstance(code, int):
        return TaskExit(alloc_id, None, None, at, "stopped" if stopped else "ended (exit status unknown)")
    if state.get("OOMKilled"):
        return TaskExit(alloc_id, None, int(signal_module.SIGKILL), at, "oom-killed")
    if 128 < code <= 128 + 64:
        number = code - 128
        reason = f"killed by signal {number} ({_signal_name(number)})"
        return TaskExit(alloc_id, None, number, at, f"stopped ({reason})" if stopped else reason)
    reason = f"exited {code}"
    return TaskExit(alloc_id, code, None, at, f"stopped ({reason})" if stopped else reason)


class DockerDriver(Driver):
    """Containers through the local Docker engine (`docker.from_env()`: DOCKER_HOST or the socket).

    `state_dir` holds the logs and exit records of ended tasks. A container's resolver is
    `TaskSpec.dns` (the scheduler passes the internal DNS server on the pm0 bridge's gateway,
    an address containers reach, unlike 127.0.0.1, which is their own loopback), else `dns`.
    """

    name = "docker"

    def __init__(
        self,
        state_dir: Path | str,
        *,
        dns: list[str] | None = None,
        driver_name: str = "docker",
        client: Any = None,
    ) -> None:
        self.name = driver_name
        self.state_dir = Path(state_dir)
        # Which pointsman owns a container: one per state directory, so that two on one engine
        # (or a test beside a running one) never adopt or clean up each other's containers.
        self.owner = hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:16]
        self.dns = list(dns) if dns else None
        self._client: Any = client
        self._closed = threading.Event()
        self._record_lock = threading.Lock()

    # -- engine -------------------------------------------------------------------------------

    def _docker(self) -> Any:
        if self._client is None:
            try:
                self._client = docker.from_env(timeout=_WAIT_CHUNK + 30, max_pool_size=MAX_WAITS + 16)
            except docker.errors.DockerException as exc:
                raise DriverError(f"docker engine not reachable: {exc}") from exc
        return self._client

    async def available(self) -> tuple[bool, str]:
        def probe() -> tuple[bool, str]:
            try:
                client = self._docker()
                client.ping()
                info = client.info()
            except (DriverError, docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                return False, f"docker engine not reachable: {exc}"
            version = info.get("ServerVersion", "?")
            missing = [name for name in ("MemoryLimit", "CPUShares") if info.get(name) is False]
            note = f"; engine cannot enforce {', '.join(missing)}" if missing else ""
            return True, f"docker engine {version} (cgroup driver {info.get('CgroupDriver', '?')}){note}"

        return await asyncio.to_thread(probe)

    # -- helpers ------------------------------------------------------------------------------

    def _container_name(self, alloc_id: str) -> str:
        return NAME_PREFIX + alloc_id

    def _exit_record(self, alloc_id: str) -> Path:
        return self.state_dir / "exits" / f"{alloc_id}.json"

    def log_paths(self, alloc_id: str) -> tuple[Path, Path]:
        logs = self.state_dir / "logs"
        return logs / f"{alloc_id}.stdout", logs / f"{alloc_id}.stderr"

    def _handle(self, container: Any) -> TaskHandle:
        attrs = container.attrs
        host_config = attrs.get("HostConfig") or {}
        memory = int(host_config.get("Memory") or 0)
        nano_cpus = int(host_config.get("NanoCpus") or 0)
        limits = f"docker memory={memory} nano_cpus={nano_cpus}" if memory or nano_cpus else "none: no limits set"
        labels = (attrs.get("Config") or {}).get("Labels") or {}
        started = _parse_time((attrs.get("State") or {}).get("StartedAt")) or time.time()
        return TaskHandle(
            alloc_id=labels.get(ALLOC_LABEL, ""),
            driver=self.name,
            ref=container.id,
            started_at=started,
            limits=limits,
            source_address=_container_address(attrs),
        )

    def _save_logs(self, container: Any, alloc_id: str) -> None:
        out_path, err_path = self.log_paths(alloc_id)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        for path, stdout in ((out_path, True), (err_path, False)):
            try:
                data = container.logs(stdout=stdout, stderr=not stdout)
            except docker.errors.DockerException:
                continue
            _write_atomically(path, data if isinstance(data, bytes) else b"")

    def _record_exit(self, task_exit: TaskExit, overwrite: bool = True) -> TaskExit:
        """Write the exit down; `overwrite=False` (wait) keeps a record stop already wrote, whose
        reason says the task was stopped. Returns the exit that stands."""
        path = self._exit_record(task_exit.alloc_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._record_lock:
            if not overwrite:
                existing = self._recorded_exit(task_exit.alloc_id)
                if existing is not None:
                    return existing
            _write_atomically(path, json.dumps(dataclasses.asdict(task_exit)).encode())
        return task_exit

    def _recorded_exit(self, alloc_id: str) -> TaskExit | None:
        try:
            data = json.loads(self._exit_record(alloc_id).read_text())
            return TaskExit(**data)
        except (OSError, ValueError, TypeError):
            return None

    def _get(self, handle: TaskHandle) -> Any | None:
        try:
            return self._docker().containers.get(handle.ref)
        except docker.errors.NotFound:
            return None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DriverError(f"docker: cannot look up container of {handle.alloc_id}: {exc}") from exc

    # -- start --------------------------------------------------------------------------------

    def _create_kwargs(self, spec: TaskSpec) -> dict[str, Any]:
        if not _ALLOC_ID_RE.match(spec.alloc_id):
            raise DriverError(
                f"alloc id {spec.alloc_id!r} is not usable in a container name (want [A-Za-z0-9][A-Za-z0-9_.-]*)"
            )
        if not spec.image:
            raise DriverError(f"{spec.alloc_id}: the docker driver needs an image")
        if not spec.command:
            raise DriverError(f"{spec.alloc_id}: empty command")
        # Inside the container the task listens on all interfaces; publishing binds spec.host.
        command, env = expand_spec(dataclasses.replace(spec, host="0.0.0.0"))
        ports = {f"{number}/tcp": (spec.host, number) for number in spec.ports.values()}
        volumes: dict[str, dict[str, str]] = {}
        for host_path, target in spec.volumes.items():
            bind, _, mode = target.partition(":")
            if not bind.startswith("/") or mode not in ("", "ro", "rw"):
                raise DriverError(f"{spec.alloc_id}: bad volume {host_path!r} -> {target!r} (want /path[:ro])")
            volumes[host_path] = {"bind": bind, "mode": mode or "rw"}
        # Our labels win: a spec must not be able to disown its container or claim another alloc.
        labels = {**spec.labels, ALLOC_LABEL: spec.alloc_id, JOB_LABEL: spec.job, OWNED_LABEL: self.owner}
        kwargs: dict[str, Any] = {
            "image": spec.image,
            "command": list(command),
            "environment": env,
            "ports": ports,
            "volumes": volumes,
            "labels": labels,
            "init": True,
            "detach": True,
            "name": self._container_name(spec.alloc_id),
        }
        if spec.memory:
            kwargs["mem_limit"] = spec.memory
            # No swap beyond the limit: otherwise the limit only moves pages to swap.
            kwargs["memswap_limit"] = spec.memory
        if spec.cpu:
            kwargs["nano_cpus"] = int(spec.cpu * 1e9)
        if spec.dns:
            kwargs["dns"] = [spec.dns]
        elif self.dns:
            kwargs["dns"] = list(self.dns)
        return kwargs

    async def start(self, spec: TaskSpec) -> TaskHandle:
        kwargs = self._create_kwargs(spec)

        def run() -> TaskHandle:
            client = self._docker()
            name = kwargs["name"]
            try:
                old = client.containers.get(name)
            except docker.errors.NotFound:
                old = None
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise DriverError(f"{spec.alloc_id}: docker engine: {exc}") from exc
            if old is not None:
                if old.status in ("running", "restarting", "paused"):
                    raise DriverError(f"{spec.alloc_id}: container {name} is already running ({old.short_id})")
                with contextlib.suppress(docker.errors.NotFound):
                    old.remove(force=True)
            with contextlib.suppress(FileNotFoundError):
                self._exit_record(spec.alloc_id).unlink()
            try:
                container = client.containers.create(**kwargs)
            except docker.errors.ImageNotFound as exc:
                raise DriverError(f"{spec.alloc_id}: image {spec.image!r} not found locally (not pulled)") from exc
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise DriverError(f"{spec.alloc_id}: docker refused to create the container: {exc}") from exc
            try:
                container.start()
                container.reload()
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
                    container.remove(force=True)
                raise DriverError(f"{spec.alloc_id}: docker could not start the container: {exc}") from exc
            return self._handle(container)

        return await asyncio.to_thread(run)

    # -- stop / wait --------------------------------------------------------------------------

    async def stop(self, handle: TaskHandle, grace: float = 5.0) -> TaskExit:
        def run() -> TaskExit:
            container = self._get(handle)
            if container is None:
                return self._recorded_exit(handle.alloc_id) or TaskExit(
                    handle.alloc_id, None, None, time.time(), "stopped (container already gone)"
                )
            was_running = container.status in ("running", "restarting", "paused", "created")
            try:
                if was_running:
                    # The engine counts whole seconds: round up, never give less than asked.
                    container.stop(timeout=max(0, math.ceil(grace)))
                container.reload()
            except docker.errors.NotFound:
                return self._recorded_exit(handle.alloc_id) or TaskExit(
                    handle.alloc_id, None, None, time.time(), "stopped (container removed meanwhile)"
                )
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise DriverError(f"{handle.alloc_id}: docker could not stop {container.short_id}: {exc}") from exc
            task_exit = _exit_from_state(handle.alloc_id, container.attrs.get("State") or {}, stopped=was_running)
            self._save_logs(container, handle.alloc_id)
            self._record_exit(task_exit)
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise DriverError(f"{handle.alloc_id}: docker could not remove {container.short_id}: {exc}") from exc
            return task_exit

        return await asyncio.to_thread(run)

    def close(self) -> None:
        """Release pending waits (within `_WAIT_CHUNK` seconds) and the engine connection. Tasks keep
        running: they are the engine's, and a new driver adopts them."""
        self._closed.set()
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()

    async def wait(self, handle: TaskHandle) -> TaskExit:
        cancelled = threading.Event()

        def run() -> TaskExit:
            while True:
                if cancelled.is_set() or self._closed.is_set():
                    raise DriverError(f"{handle.alloc_id}: wait abandoned (cancelled or driver closed)")
                container = self._get(handle)
                if container is None:
                    return self._recorded_exit(handle.alloc_id) or TaskExit(
                        handle.alloc_id, None, None, time.time(), "ended (container gone)"
                    )
                try:
                    container.wait(timeout=_WAIT_CHUNK)
                except docker.errors.NotFound:
                    continue
                except requests.exceptions.RequestException:
                    # The wait request timed out (the task still runs) or the connection broke: ask again.
                    continue
                except docker.errors.DockerException as exc:
                    raise DriverError(f"{handle.alloc_id}: docker wait failed: {exc}") from exc
                try:
                    container.reload()
                except docker.errors.NotFound:
                    continue
                state = container.attrs.get("State") or {}
                if state.get("Running"):
                    continue
                task_exit = _exit_from_state(handle.alloc_id, state)
                self._save_logs(container, handle.alloc_id)
                return self._record_exit(task_exit, overwrite=False)

        if self._closed.is_set():
            raise DriverError(f"{handle.alloc_id}: driver closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[TaskExit] = loop.create_future()

        def deliver(result: TaskExit | None, error: BaseException | None) -> None:
            if future.done():  # the waiter was cancelled
                return
            if error is not None:
                future.set_exception(error)
            elif result is not None:
                future.set_result(result)

        def thread_main() -> None:
            try:
                outcome: tuple[TaskExit | None, BaseException | None] = (run(), None)
            except Exception as exc:
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(deliver, *outcome)

        threading.Thread(target=thread_main, name=f"docker-wait-{handle.alloc_id}", daemon=True).start()
        try:
            return await future
        except asyncio.CancelledError:
            cancelled.set()
            raise

    # -- adoption / orphans -------------------------------------------------------------------

    def _ours(self, all_states: bool) -> list[Any]:
        try:
            return list(
                self._docker().containers.list(all=all_states, filters={"label": f"{OWNED_LABEL}={self.owner}"})
            )
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DriverError(f"docker: cannot list containers: {exc}") from exc

    async def running(self) -> list[TaskHandle]:
        def run() -> list[TaskHandle]:
            return [self._handle(c) for c in self._ours(all_states=False) if c.status == "running"]

        return await asyncio.to_thread(run)

    async def cleanup(self, keep: set[str]) -> list[str]:
        """Stop and remove every container of ours (running or exited) whose alloc is not kept."""
        orphans = [handle for handle in await asyncio.to_thread(self._all_handles) if handle.alloc_id not in keep]
        removed: list[str] = []
        for handle in orphans:
            await self.stop(handle, grace=2.0)
            removed.append(handle.alloc_id)
        return removed

    def _all_handles(self) -> list[TaskHandle]:
        return [self._handle(c) for c in self._ours(all_states=True)]


def _container_address(attrs: dict[str, Any]) -> str | None:
    """The container's address on the engine's network (the default bridge, else the first
    network it is on): where its connections to the host come from."""
    settings = attrs.get("NetworkSettings") or {}
    if settings.get("IPAddress"):
        return str(settings["IPAddress"])
    for network in (settings.get("Networks") or {}).values():
        if network and network.get("IPAddress"):
            return str(network["IPAddress"])
    return None
