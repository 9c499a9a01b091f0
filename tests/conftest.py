from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterator, Mapping

import pytest

from tests.mysqlserver import MySqlServer, find_binaries
from tests.pgserver import PgServer, find_bin_dir
from tests.support import missing

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a runtime dependency on Linux
    uvloop = None


def pytest_asyncio_loop_factories() -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on the loop production runs on: uvloop where installed."""
    if uvloop is not None:
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """Started on first use (~1 s), stopped and deleted at the end of the session.

    Without PostgreSQL's server binaries the tests that use it are skipped on a developer's
    machine (`make test` installs them when it runs as root) but fail in CI, where a missing
    package must not turn into a quietly green run."""
    if find_bin_dir() is None:
        missing("no PostgreSQL server binaries (apt-get install postgresql, or set PG_BIN)")
    with PgServer() as server:
        yield server


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[MySqlServer]:
    """A throwaway MariaDB (tests/mysqlserver.py), started on first use (~0.6 s), stopped and
    deleted at the end of the session. Skipped without the MariaDB binaries, failed under CI,
    like pg_server."""
    if find_binaries() is None:
        missing("no MariaDB binaries (apt-get install mariadb-server mariadb-client, or set MARIADB_BIN)")
    with MySqlServer() as server:
        yield server


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something listens on (for the server fixtures' retry on a taken port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nothing listens on: bound (so nobody else takes it) but not listening, so a
    connection to it is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every pointsman a test starts without a state_dir keeps its state in this session's own
    directory (inherited by subprocesses), never in the checkout's `.pointsman/`."""
    previous = os.environ.get("POINTSMAN_STATE_DIR")
    os.environ["POINTSMAN_STATE_DIR"] = str(tmp_path_factory.mktemp("pointsman-state"))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("POINTSMAN_STATE_DIR", None)
        else:
            os.environ["POINTSMAN_STATE_DIR"] = previous
