"""The demo's two workloads, for real: scripts/demo-postgres.sh (a PostgreSQL server the
scheduler runs and stops with SIGTERM) and apps/demo/app.py (the web service), started as
subprocesses the way the process driver starts them (a session of their own), talking over
real TCP. Skipped only when the PostgreSQL server binaries are missing (`make deps`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.pgserver import find_bin_dir

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "demo-postgres.sh"
APP = ROOT / "apps" / "demo" / "app.py"
INSTANCE = "web-0-test"

pytestmark = pytest.mark.skipif(
    find_bin_dir() is None, reason="no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: run `make deps`"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def http(method: str, url: str, form: dict[str, str] | None = None, body: Any = None) -> tuple[int, str]:
    data, headers = None, {}
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
    elif body is not None:
        data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def http_json(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    status, text = http(method, url, **kwargs)
    return status, json.loads(text)


class Demo:
    """The processes of one test; `close()` stops whatever still runs, whatever happened."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.datadir = base / "pg" / "data"
        self.pg_port = free_port()
        self.http_port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.pg: subprocess.Popen[bytes] | None = None
        self.app: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.pg_port} user=postgres dbname=demo connect_timeout=2"

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.base / f"{name}.{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # What the scheduler's process driver gives a task: PATH and the job's env only.
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
                start_new_session=True,  # as the process driver does
            )
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[self.procs.index(proc)].read_text(errors="replace")

    def run_script(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **(env or {})},
        )

    def start_pg(self) -> subprocess.Popen[bytes]:
        self.pg = self.spawn("pg", ["bash", str(SCRIPT), str(self.datadir), str(self.pg_port)])
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.dsn()) as conn:
                    conn.execute("SELECT 1")
                return self.pg
            except psycopg.OperationalError:
                if self.pg.poll() is not None:
                    raise AssertionError(
                        f"demo-postgres.sh exited {self.pg.returncode}:\n{self.output(self.pg)}"
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"PostgreSQL not accepting connections:\n{self.output(self.pg)}") from None
                time.sleep(0.1)

    def start_app(self) -> subprocess.Popen[bytes]:
        env = {
            "HOST": "127.0.0.1",
            "PORT_HTTP": str(self.http_port),
            "DB_ADDR": f"127.0.0.1:{self.pg_port}",
            "POINTSMAN_ALLOC_ID": INSTANCE,
        }
        self.app = self.spawn("app", [sys.executable, str(APP)], env)
        app = self.app

        def serving() -> bool:
            if app.poll() is not None:
                raise AssertionError(f"app.py exited {app.returncode}:\n{self.output(app)}")
            return port_open(self.http_port)

        wait_for(serving, 15, "the demo app to listen")
        return app

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5) -> tuple[int, float]:
        """SIGTERM to the process (not its group); its exit status and how long it took."""
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=timeout)
        return code, time.monotonic() - started

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything left in its group
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()


@pytest.fixture
def demo() -> Iterator[Demo]:
    # Not pytest's tmp_path: as root it is /tmp/pytest-of-root (0700), which the postgres user
    # the script drops to cannot traverse.
    base = Path(tempfile.mkdtemp(prefix="pointsman-demo-", dir="/tmp"))
    base.chmod(0o755)
    d = Demo(base)
    try:
        yield d
    finally:
        try:
            d.close()
        finally:
            shutil.rmtree(base, ignore_errors=True)


def test_pages_orders_and_purge(demo: Demo) -> None:
    demo.start_pg()
    app = demo.start_app()

    status, page = http("GET", demo.url + "/")
    assert status == 200
    assert INSTANCE in page and "/orders/purge" in page

    status, health = http_json("GET", demo.url + "/healthz")
    assert status == 200
    assert health["instance"] == INSTANCE
    assert health["db"]["reachable"] is True

    created = []
    for kwargs in ({"form": {"item": "tea"}}, {"body": {"item": "cake"}}, {"form": {"item": "jam"}}):
        status, order = http_json("POST", demo.url + "/orders", **kwargs)
        assert status == 201, order
        created.append(order)
    assert [o["item"] for o in created] == ["tea", "cake", "jam"]
    assert created[0]["id"] < created[1]["id"] < created[2]["id"]
    assert created[0]["created_at"]

    for bad in ({"form": {"item": " "}}, {"body": {"thing": 1}}, {"body": ["item"]}):
        status, error = http_json("POST", demo.url + "/orders", **bad)
        assert status == 400, (bad, error)

    status, listing = http_json("GET", demo.url + "/orders")
    assert status == 200
    assert listing["count"] == 3
    assert [o["item"] for o in listing["orders"]] == ["jam", "cake", "tea"]  # newest first

    with psycopg.connect(demo.dsn()) as conn:
        names = conn.execute("SELECT application_name, ssl FROM pg_stat_activity JOIN pg_stat_ssl USING (pid)")
        assert ("demo-web", False) in names.fetchall()

    status, purged = http_json("POST", demo.url + "/orders/purge")
    assert (status, purged["deleted"]) == (200, 3)
    status, listing = http_json("GET", demo.url + "/orders")
    assert (status, listing["count"], listing["orders"]) == (200, 0, [])

    # SIGTERM stops the app cleanly, and it logged one line per request.
    code, took = demo.stop(app)
    assert code == 0 and took < 5
    out = demo.output(app)
    assert out.count('"POST /orders HTTP/1.1"') == 6
    assert '"POST /orders/purge HTTP/1.1" 200' in out


def test_purge_refused_is_403_with_the_sqlstate(demo: Demo) -> None:
    """A DELETE refused with SQLSTATE 42501 (here by a trigger; in the demo by a policy of the
    SQL listener) is a 403 carrying the server's message; other database errors are 503."""
    demo.start_pg()
    demo.start_app()
    assert http_json("POST", demo.url + "/orders", form={"item": "keep me"})[0] == 201

    with psycopg.connect(demo.dsn(), autocommit=True) as conn:
        conn.execute(
            """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'DELETE is not allowed here' USING ERRCODE = TG_ARGV[0]; END $$"""
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE DELETE ON orders FOR EACH STATEMENT EXECUTE FUNCTION refuse('42501')"
        )
    status, error = http_json("POST", demo.url + "/orders/purge")
    assert status == 403
    assert error == {"error": "DELETE is not allowed here", "sqlstate": "42501"}

    with psycopg.connect(demo.dsn(), autocommit=True) as conn:
        conn.execute("DROP TRIGGER refuse ON orders")
        conn.execute(
            "CREATE TRIGGER refuse BEFORE DELETE ON orders FOR EACH STATEMENT EXECUTE FUNCTION refuse('P0001')"
        )
    status, error = http_json("POST", demo.url + "/orders/purge")
    assert (status, error["sqlstate"]) == (503, "P0001")

    # A server error is not an unreachable database, and the connection stays usable.
    status, health = http_json("GET", demo.url + "/healthz")
    assert (status, health["db"]["reachable"]) == (200, True)
    assert http_json("GET", demo.url + "/orders")[1]["count"] == 1


def test_sigterm_stops_postgres_and_a_restart_keeps_the_rows(demo: Demo) -> None:
    pg = demo.start_pg()
    assert "initializing a new cluster" in demo.output(pg)
    demo.start_app()
    for item in ("one", "two"):
        assert http_json("POST", demo.url + "/orders", form={"item": item})[0] == 201
    # The app holds idle pooled connections: PostgreSQL's own SIGTERM (smart shutdown) would
    # wait for them forever; the script turns it into a fast shutdown.
    code, took = demo.stop(pg, timeout=5)
    assert code == 0, demo.output(pg)
    assert took < 5
    assert not port_open(demo.pg_port)
    assert "fast shutdown" in demo.output(pg)

    # Still healthy (routable) while the database is down, and saying so.
    def reports_down() -> bool:
        status, health = http_json("GET", demo.url + "/healthz")
        assert status == 200
        return health["db"]["reachable"] is False and bool(health["db"]["error"])

    wait_for(reports_down, 10, "/healthz to report the database unreachable")
    status, error = http_json("GET", demo.url + "/orders")
    assert status == 503 and error["sqlstate"] is None

    pg = demo.start_pg()
    assert "reusing the cluster" in demo.output(pg)
    status, listing = http_json("GET", demo.url + "/orders")  # the app reconnects by itself
    assert status == 200, listing
    assert sorted(o["item"] for o in listing["orders"]) == ["one", "two"]

    def reports_up() -> bool:
        return http_json("GET", demo.url + "/healthz")[1]["db"]["reachable"] is True

    wait_for(reports_up, 10, "/healthz to report the database reachable again")

    # The way the scheduler stops a task: SIGTERM to its process group (the script and the
    # postmaster both get it; the postmaster's smart shutdown is made a fast one).
    os.killpg(pg.pid, signal.SIGTERM)
    assert pg.wait(timeout=5) == 0, demo.output(pg)
    wait_for(lambda: not port_open(demo.pg_port), 5, "the port to close")


def test_restart_after_a_kill_removes_a_stale_pid_file(demo: Demo) -> None:
    """SIGKILL to the job's process group (the scheduler after kill_timeout, or a crash) leaves
    postmaster.pid behind; when its pid belongs to another process of the server's user by the
    next start (pid reuse, common after a reboot or in a container), postgres alone refuses to
    start ("lock file already exists")."""
    pg = demo.start_pg()
    with psycopg.connect(demo.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE t(x int)")
        conn.execute("INSERT INTO t VALUES (42)")
    os.killpg(pg.pid, signal.SIGKILL)
    pg.wait(timeout=5)
    pidfile = demo.datadir / "postmaster.pid"
    assert pidfile.exists()
    wait_for(lambda: not port_open(demo.pg_port), 10, "the killed server's port to close")

    # A live process that is no postmaster, of the server's user (postgres ignores a pid that
    # belongs to another user: kill(pid, 0) fails with EPERM there, not so for its own).
    as_server_user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"] if os.geteuid() == 0 else []
    squatter = demo.spawn("squatter", [*as_server_user, "sleep", "60"])
    wait_for(lambda: Path(f"/proc/{squatter.pid}/cmdline").read_bytes().startswith(b"sleep"), 5, "the squatter")
    lines = pidfile.read_text().splitlines()
    pidfile.write_text("\n".join([str(squatter.pid), *lines[1:]]) + "\n")

    pg = demo.start_pg()
    assert "removing a stale" in demo.output(pg)
    with psycopg.connect(demo.dsn()) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]

    # While it runs, a second start on the same directory is refused, and leaves it alone.
    second = demo.run_script(str(demo.datadir), str(free_port()))
    assert second.returncode == 2
    assert f"already runs on {demo.datadir}" in second.stderr
    with psycopg.connect(demo.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_clear_errors(demo: Demo) -> None:
    result = demo.run_script(str(demo.datadir), str(demo.pg_port), env={"PG_BIN": "/nonexistent"})
    assert result.returncode == 2
    assert "PG_BIN=/nonexistent does not hold the PostgreSQL server binaries" in result.stderr
    assert "make deps" in result.stderr

    result = demo.run_script(str(demo.datadir))
    assert result.returncode == 2 and "usage:" in result.stderr
    result = demo.run_script(str(demo.datadir), "http")
    assert result.returncode == 2 and "PORT must be a number" in result.stderr

    not_a_cluster = demo.base / "other"
    not_a_cluster.mkdir()
    (not_a_cluster / "precious.txt").write_text("mine")
    result = demo.run_script(str(not_a_cluster), str(demo.pg_port))
    assert result.returncode == 2 and "holds no PostgreSQL cluster" in result.stderr
    assert (not_a_cluster / "precious.txt").read_text() == "mine"
    # (A DATADIR the postgres user cannot reach is moved to /var/lib/pointsman-demo when root:
    # tests/pointsman/test_demo.py runs the demo from a private temporary directory.)
