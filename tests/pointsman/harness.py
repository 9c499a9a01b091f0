"""Running the real ``pointsman`` command in tests: start it, read where it listens from its
output, talk to it, and always kill it at the end."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

_SCRIPT = Path(sys.executable).with_name("pointsman")
# The console script `pip install -e .` creates; `python -m pointsman` when it is missing.
POINTSMAN: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "pointsman"]

LISTENER_LINE = re.compile(r"pointsman: listener (\S+) (http|tcp) (\S+)$")
ADMIN_LINE = re.compile(r"pointsman: admin (\S+)$")
READY_LINE = re.compile(r"pointsman: ready: ")


@asynccontextmanager
async def http_upstream(app: web.Application) -> AsyncIterator[tuple[str, int]]:
    """An aiohttp server for ``app`` on 127.0.0.1:0; the port read back through the runner's
    public ``addresses`` (works on uvloop, whose Server is not an asyncio.Server)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield host, port
    finally:
        await runner.cleanup()


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write in place (what an editor without atomic saves does)."""
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def replace_config(path: Path, config: dict[str, Any]) -> None:
    """Write a new file beside it and rename it over: an atomic save (new inode)."""
    tmp = path.with_name(path.name + ".tmp")
    write_config(tmp, config)
    os.replace(tmp, path)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``check`` until it returns True: for effects that arrive asynchronously."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def run_cli(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """A short-lived ``pointsman`` command: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        *POINTSMAN, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class PointsmanProcess:
    """A running ``pointsman`` whose output is collected line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.eof = False
        self._new_line = asyncio.Event()
        self.admin = ""  # host:port
        self.listeners: dict[str, str] = {}  # name -> host:port

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def read_output(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
        self.eof = True
        self._new_line.set()

    async def wait_for(self, pattern: re.Pattern[str], *, after: int = 0, timeout: float = 15.0) -> re.Match[str]:
        """The first output line from index ``after`` on that matches."""
        index = after
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while index < len(self.lines):
                        match = pattern.search(self.lines[index])
                        index += 1
                        if match is not None:
                            return match
                    if self.eof:
                        raise AssertionError(f"pointsman exited before printing {pattern.pattern!r}:\n{self.output}")
                    # No await between the scan and here, so no line can slip in unseen.
                    self._new_line.clear()
                    await self._new_line.wait()
        except TimeoutError:
            raise AssertionError(f"no line matching {pattern.pattern!r} within {timeout}s:\n{self.output}") from None

    def send_signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(f"pointsman did not exit within {timeout}s:\n{self.output}") from None

    def url(self, path: str) -> str:
        return f"http://{self.admin}{path}"

    def listener_url(self, name: str, path: str) -> str:
        return f"http://{self.listeners[name]}{path}"


@asynccontextmanager
async def pointsman(*args: str) -> AsyncIterator[PointsmanProcess]:
    """``pointsman ARGS``, ready to serve: its admin and listener addresses parsed from its log."""
    proc = await asyncio.create_subprocess_exec(
        *POINTSMAN, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    running = PointsmanProcess(proc)
    reader = asyncio.create_task(running.read_output())
    try:
        await running.wait_for(READY_LINE)
        # The address lines come before the ready line.
        for line in running.lines:
            if (m := ADMIN_LINE.search(line)) is not None:
                running.admin = m.group(1)
            elif (m := LISTENER_LINE.search(line)) is not None:
                running.listeners[m.group(1)] = m.group(3)
        assert running.admin, running.output
        yield running
    finally:
        if proc.returncode is None:
            # SIGTERM first: a pointsman that runs jobs stops their tasks on the way out (a
            # SIGKILL would leave them running, to be adopted by the next start).
            proc.terminate()
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
        await proc.wait()
        await reader


def up_args(config: Path, *extra: str) -> Sequence[str]:
    return ("up", "--config", str(config), *extra)
