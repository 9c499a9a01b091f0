"""What the throwaway database servers of the tests and benchmarks share (tests/pgserver.py,
tests/mysqlserver.py): a free port to hand over, the system account a server runs as when we
are root (PostgreSQL and MariaDB refuse to run as root), a temp dir that account can reach, the
NAME=VALUE settings of the command line, and ``--serve``: print the port, run until a signal.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, TypeVar


def free_port() -> int:
    """A port nobody listens on right now. The servers cannot bind port 0 and report the port
    they got, so we probe and hand the number over; their start() retries if someone takes it
    first."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def others_can_traverse(path: Path) -> bool:
    """Whether a different (unprivileged) user can reach entries below ``path``: every ancestor
    must be searchable by "others". /root, or a TMPDIR under it, is not."""
    for directory in (path, *path.parents):
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return False
    return True


def system_account(name: str, error: type[Exception], package: str) -> pwd.struct_passwd | None:
    """Who runs the server binaries: None for ourselves, or the ``name`` account when we are
    root (``package``, Debian's, creates it); ``error`` says what is missing otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise error(
            f"running as root, and the server will not run as root; there is no '{name}' system user "
            f"to run it as ({package} creates it): useradd --system {name}, or run as an unprivileged user"
        ) from None
    if shutil.which("runuser") is None:
        raise error(f"running as root without runuser (util-linux) to drop to the {name} user")
    return account


def make_base_dir(prefix: str, account: pwd.struct_passwd | None, subdirs: Iterable[str] = ()) -> Path:
    """A fresh temp dir (and ``subdirs``), owned by ``account`` when there is one: under /tmp if
    that account could not reach the usual temp dir (e.g. one under /root)."""
    parent = Path(tempfile.gettempdir())
    if account is not None and not others_can_traverse(parent):
        parent = Path("/tmp")
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    paths = [base]
    for sub in subdirs:
        (base / sub).mkdir()
        paths.append(base / sub)
    if account is not None:
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)
    return base


class _Served(Protocol):
    port: int


S = TypeVar("S", bound=_Served)


def settings_of(parser: argparse.ArgumentParser, items: Iterable[str]) -> dict[str, str]:
    """``--set NAME=VALUE`` arguments as a dict (a malformed one is the parser's error)."""
    settings: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--set takes NAME=VALUE, not {item!r}")
        settings[name] = value
    return settings


def serve(
    name: str,
    server: Callable[[], AbstractContextManager[S]],
    ready: Callable[[S, threading.Event], str],
    alive: Callable[[S], bool] = lambda _: True,
    errors: tuple[type[Exception], ...] = (RuntimeError,),
) -> int:
    """``--serve``: start ``server()``, let ``ready`` finish setting it up (it may look at the
    stop flag) and describe it, print its port on the first line of stdout, then run until
    SIGTERM, SIGINT or SIGHUP, and stop it (deleting its directory). The handlers are installed
    first: a signal during the start still cleans up rather than leaving a half-built server.
    Exit status 2 when it cannot start or dies on its own."""
    stopped = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopped.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        with server() as running:
            described = ready(running, stopped)
            print(running.port, flush=True)
            print(described, file=sys.stderr, flush=True)
            while not stopped.wait(1.0):  # a timed wait: signal handlers run in between
                if not alive(running):
                    print(f"{name}: the server exited unexpectedly", file=sys.stderr)
                    return 2
    except errors as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    return 0


# A watchdog process per server: if the process that started the server dies without stopping it
# (SIGKILL, a crash, a CI timeout), the kernel tells the watchdog (PR_SET_PDEATHSIG), which stops
# the server named in its pid file and deletes its directory. Without it, an interrupted test run
# leaves database servers behind, running as another user in a temp dir.
_WATCHDOG = r"""
import ctypes, os, shutil, signal, sys, time
parent, pid_file, base = int(sys.argv[1]), sys.argv[2], sys.argv[3]
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
while os.getppid() == parent and signal.sigtimedwait({signal.SIGTERM}, 1.0) is None:
    pass
try:
    with open(pid_file) as f:
        pid = int(f.readline())
except (OSError, ValueError):
    pid = 0
if pid > 0:
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            time.sleep(0.1)
            os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
shutil.rmtree(base, ignore_errors=True)
"""


def start_watchdog(pid_file: Path, base_dir: Path) -> subprocess.Popen[bytes]:
    """Guard a server whose pid will be in ``pid_file`` and whose files are under ``base_dir``
    against this process dying without stopping it. Start it from the thread that will stop the
    server (the kernel's parent-death signal follows the thread). :func:`stop_watchdog` it
    before a normal stop."""
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(pid_file), str(base_dir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the test run is the test run's to handle
    )


def stop_watchdog(watchdog: subprocess.Popen[bytes] | None) -> None:
    """A normal stop is coming: end the watchdog without it acting (SIGKILL)."""
    if watchdog is not None and watchdog.poll() is None:
        watchdog.kill()
        watchdog.wait()
