"""The supervisor's lifecycle in-process, with small real components that record what they are
asked to do (the supervisor and its admin API are the real ones)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pointsman.config import Config, parse_config
from pointsman.errors import ConfigError
from pointsman.supervisor import Component, RouterComponent, State, Supervisor, build_supervisor
from router.config import format_address
from tests.pointsman.harness import write_config
from tests.support import echo_server

ADMIN_ONLY: dict[str, Any] = {"admin": {"listen": "127.0.0.1:0"}}


class Recorder(Component):
    """A component that logs its calls into a shared list and can be told to fail or block."""

    config_section = "recorder"

    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events
        self.fail_start: Exception | None = None
        self.fail_reload: Exception | None = None
        self.stop_gate: asyncio.Event | None = None  # stop() waits for it
        self.stop_cancelled = False
        self.config: Config | None = None

    async def start(self, config: Config) -> None:
        self.events.append(f"start {self.name}")
        if self.fail_start is not None:
            raise self.fail_start
        self.config = config

    async def reload(self, config: Config) -> None:
        self.events.append(f"reload {self.name} {config.digest()}")
        if self.fail_reload is not None:
            raise self.fail_reload
        self.config = config

    async def stop(self, deadline: float) -> None:
        self.events.append(f"stop {self.name}")
        if self.stop_gate is not None:
            try:
                await self.stop_gate.wait()
            except asyncio.CancelledError:
                self.stop_cancelled = True
                raise


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def _supervisor(path: Path, config: dict[str, Any], *components: Component) -> Supervisor:
    write_config(path, config)
    return Supervisor(parse_config(config), path, components, handle_signals=False, watch_interval=None)


def _admin_url(supervisor: Supervisor, path: str) -> str:
    assert supervisor.admin.address is not None
    return f"http://{format_address(supervisor.admin.address)}{path}"


async def test_ordered_start_and_reverse_stop_with_admin_up_while_draining(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    events: list[str] = []
    first, second = Recorder("first", events), Recorder("second", events)
    second.stop_gate = asyncio.Event()
    supervisor = _supervisor(tmp_path / "c.yaml", ADMIN_ONLY, first, second)
    await supervisor.start()
    assert events == ["start first", "start second"]
    async with session.get(_admin_url(supervisor, "/readyz")) as r:
        assert (r.status, await r.text()) == (200, "ready\n")

    shutdown = asyncio.create_task(supervisor.shutdown())
    try:
        while events[-1] != "stop second":
            await asyncio.sleep(0.01)
        # "second" is draining: the admin API (stopped last) still answers, not ready.
        async with session.get(_admin_url(supervisor, "/readyz")) as r:
            assert (r.status, await r.text()) == (503, "draining\n")
        async with session.get(_admin_url(supervisor, "/healthz")) as r:
            assert r.status == 200
        second.stop_gate.set()
        await shutdown
    finally:
        second.stop_gate.set()
        await asyncio.gather(shutdown, return_exceptions=True)
    assert events == ["start first", "start second", "stop second", "stop first"]
    assert supervisor.state is State.STOPPED
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(_admin_url(supervisor, "/healthz")):
            pass
    assert (await supervisor.reload("test")).status == "stopping"


async def test_a_failed_start_stops_what_started(tmp_path: Path) -> None:
    events: list[str] = []
    first, second = Recorder("first", events), Recorder("second", events)
    second.fail_start = OSError(98, "address already in use")
    supervisor = _supervisor(tmp_path / "c.yaml", ADMIN_ONLY, first, second)
    with pytest.raises(ConfigError) as caught:
        await supervisor.start()
    assert caught.value.problems[0].path == "recorder"
    assert "cannot start the second" in caught.value.problems[0].reason
    assert events == ["start first", "start second", "stop first"]
    assert supervisor.state is State.STOPPED
    assert supervisor.admin.runner is None  # the admin server was stopped too


async def test_a_component_refusing_a_reload_rolls_back_the_others(tmp_path: Path) -> None:
    events: list[str] = []
    first, second = Recorder("first", events), Recorder("second", events)
    path = tmp_path / "c.yaml"
    supervisor = _supervisor(path, ADMIN_ONLY, first, second)
    await supervisor.start()
    try:
        old = supervisor.digest
        new_config = {"admin": {"listen": "127.0.0.1:0"}, "clusters": {"x": {"endpoints": ["127.0.0.1:1"]}}}
        write_config(path, new_config)
        new = parse_config(new_config).digest()
        second.fail_reload = OSError(98, "address already in use")
        result = await supervisor.reload("test")
        assert result.status == "refused"
        assert result.hash == old
        assert result.error is not None
        assert result.error.problems[0].path == "recorder"
        assert "address already in use" in result.error.problems[0].reason
        # first applied the new config, then went back to the running one.
        assert events[2:] == [f"reload first {new}", f"reload second {new}", f"reload first {old}"]
        assert supervisor.digest == old
        assert first.config is not None and first.config.digest() == old
        assert supervisor.stats.reload_failures.get(()) == 1
        assert supervisor.stats.reloads.get(("failure",)) == 1

        second.fail_reload = None
        assert (await supervisor.reload("test")).status == "reloaded"
        assert supervisor.digest == new
        assert supervisor.stats.config_hash == new
        assert supervisor.stats.reloads.get(("success",)) == 1
    finally:
        await supervisor.shutdown()


async def test_a_second_stop_request_stops_waiting(tmp_path: Path) -> None:
    events: list[str] = []
    stuck = Recorder("stuck", events)
    stuck.stop_gate = asyncio.Event()  # never set: only forcing ends its stop
    supervisor = _supervisor(tmp_path / "c.yaml", ADMIN_ONLY, stuck)
    supervisor.drain_timeout = 30.0
    await supervisor.start()
    run = asyncio.create_task(supervisor.run_until_stopped())
    try:
        supervisor.request_stop()
        while events[-1] != "stop stuck":
            await asyncio.sleep(0.01)
        supervisor.request_stop()
        async with asyncio.timeout(5):
            assert await run == 0
    finally:
        stuck.stop_gate.set()
        await asyncio.gather(run, return_exceptions=True)
    assert stuck.stop_cancelled
    assert supervisor.state is State.STOPPED
    assert supervisor.admin.runner is None  # stopped after the forced one, not skipped


async def test_file_watcher_debounces_and_skips_what_was_already_loaded(tmp_path: Path) -> None:
    events: list[str] = []
    recorder = Recorder("r", events)
    path = tmp_path / "c.yaml"
    write_config(path, ADMIN_ONLY)
    supervisor = Supervisor(parse_config(ADMIN_ONLY), path, [recorder], handle_signals=False, watch_interval=0.05)
    run = asyncio.create_task(supervisor.run_until_stopped())
    try:
        while supervisor.state is not State.READY:
            await asyncio.sleep(0.01)
        changed = {"admin": {"listen": "127.0.0.1:0"}, "clusters": {"x": {"endpoints": ["127.0.0.1:1"]}}}
        write_config(path, changed)
        # Reloaded through the API before the watcher sees it: the watcher must not reload
        # the same file again (it would be counted "unchanged").
        assert (await supervisor.reload("test")).status == "reloaded"
        renamed = {"admin": {"listen": "127.0.0.1:0"}, "clusters": {"y": {"endpoints": ["127.0.0.1:1"]}}}
        tmp = tmp_path / "next.yaml"
        write_config(tmp, renamed)
        tmp.replace(path)
        async with asyncio.timeout(5):
            while supervisor.digest != parse_config(renamed).digest():
                await asyncio.sleep(0.02)
        assert supervisor.stats.reloads.get(("unchanged",)) == 0
        assert supervisor.stats.reloads.get(("success",)) == 2
    finally:
        supervisor.request_stop()
        async with asyncio.timeout(5):
            await run


async def _echo_once(address: tuple[str, int], payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_reload_that_cannot_bind_is_refused_and_the_old_config_serves(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The real router: a new listener on a taken port fails the reload as a whole."""
    async with echo_server() as echo:
        v1: dict[str, Any] = {
            "admin": {"listen": "127.0.0.1:0"},
            "clusters": {"echo": {"endpoints": [format_address(echo)]}},
            "listeners": [{"name": "echo", "listen": "127.0.0.1:0", "protocol": "tcp", "to": "echo"}],
        }
        path = tmp_path / "c.yaml"
        write_config(path, v1)
        supervisor = build_supervisor(parse_config(v1), path, handle_signals=False, watch_interval=None)
        await supervisor.start()
        taken = socket.socket()
        try:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            router = supervisor.component("router")
            assert isinstance(router, RouterComponent)
            address = router.router.address_of("echo")
            assert router.endpoints() == [f"listener echo tcp {format_address(address)}"]
            assert await _echo_once(address, b"before") == b"before"

            v2 = {**v1, "listeners": [*v1["listeners"], {**v1["listeners"][0], "name": "second"}]}
            v2["listeners"][1]["listen"] = format_address(taken.getsockname())
            write_config(path, v2)
            async with session.post(_admin_url(supervisor, "/reload")) as r:
                assert r.status == 400
                body = await r.json()
            assert body["status"] == "refused"
            assert body["hash"] == parse_config(v1).digest()
            [error] = body["errors"]
            assert error["path"] == "listeners"
            assert "address already in use" in error["reason"]
            assert supervisor.digest == parse_config(v1).digest()
            assert supervisor.stats.reload_failures.get(()) == 1
            assert set(router.router.listeners) == {"echo"}
            assert router.router.address_of("echo") == address
            assert await _echo_once(address, b"after") == b"after"
        finally:
            taken.close()
            await supervisor.shutdown()
