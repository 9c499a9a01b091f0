"""A throwaway PostgreSQL server for tests and benchmarks, built from the installed binaries.

    with PgServer() as pg:                  # initdb + start on a free 127.0.0.1 port
        psycopg.connect(pg.dsn())           # postgres, trust
        psycopg.connect(pg.dsn(MD5_USER, password=MD5_PASSWORD))
        pgbench_init(pg, scale=1)

    python -m tests.pgserver --serve [--scale N]
        start one, print its port on the first line of stdout, run until SIGTERM/SIGINT
        (bench/pg.sh uses this), then stop it and delete its directory.

What it sets up: a cluster in a temp dir, listening on 127.0.0.1 only (and a unix socket in
the temp dir, never in /var/run/postgresql where the machine's own server lives), the
superuser ``postgres`` (trust over TCP), a database ``test``, and two password users so
tests can check that authentication passes through a proxy untouched: ``md5user`` (password
stored as MD5, ``md5`` in pg_hba) and ``scramuser`` (SCRAM-SHA-256 verifier,
``scram-sha-256`` in pg_hba). Durability is off (fsync, full_page_writes, synchronous_commit):
the data is deleted at the end anyway, and it makes initdb + start ~1 s instead of several.

initdb and postgres refuse to run as root. As root we run them as the ``postgres`` system user
(Debian's packages create it) through ``runuser`` and hand it the temp dir; as anyone else
they run as the current user.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from tests.throwaway import (
    free_port,
    make_base_dir,
    serve,
    settings_of,
    start_watchdog,
    stop_watchdog,
    system_account,
)

MD5_USER, MD5_PASSWORD = "md5user", "md5pass"
SCRAM_USER, SCRAM_PASSWORD = "scramuser", "scrampass"
SUPERUSER = "postgres"  # the cluster's superuser role (initdb -U)
SYSTEM_USER = "postgres"  # the account the server runs as when we are root
DATABASE = "test"

# The server binaries Debian installs per major version; the newest version found wins.
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")

# Fast and small: a test cluster holds a few rows, and nothing in it must survive a crash.
# Values are written single-quoted, which postgresql.conf accepts for every type.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "100",
    "shared_buffers": "16MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # No background churn competing with what a benchmark measures.
    "autovacuum": "off",
    "log_min_messages": "warning",
    "log_checkpoints": "off",
}

# pg_hba is read top to bottom, first match wins: the password users come before the trust
# line that lets every other user (postgres, pgbench) in without one.
PG_HBA = f"""\
# TYPE  DATABASE  USER          ADDRESS        METHOD
local   all       all                          trust
host    all       {MD5_USER}    127.0.0.1/32   md5
host    all       {SCRAM_USER}  127.0.0.1/32   scram-sha-256
host    all       all           127.0.0.1/32   trust
"""

# Run in single-user mode before the first start (no client library needed, no network).
# password_encryption decides how each PASSWORD is stored; pg_hba's md5 method accepts only an
# MD5 hash or a SCRAM verifier, so md5user gets an MD5 hash to exercise real MD5 auth.
# Since PostgreSQL 15 PUBLIC may not create in schema public; the grant on template1's schema
# is copied into ``test`` by CREATE DATABASE, so the password users can create tables there.
SETUP_SQL = f"""\
SET password_encryption = 'md5';
CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}';
SET password_encryption = 'scram-sha-256';
CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}';
GRANT ALL ON SCHEMA public TO {MD5_USER}, {SCRAM_USER};
CREATE DATABASE {DATABASE};
"""

START_ATTEMPTS = 5
START_TIMEOUT_S = 30
# What the postmaster logs when another process took the port between our probe and its bind.
_BIND_FAILURE = re.compile(r"could not bind|could not create listen socket|Address already in use")


class PgServerError(RuntimeError):
    """The server could not be set up or started; the message carries the tool's output."""


def find_bin_dir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None when PostgreSQL is missing.

    $PG_BIN wins (another layout, another version); then Debian's newest
    /usr/lib/postgresql/<major>/bin; then the PATH (distributions that put them there)."""
    candidates: list[Path] = []
    if os.environ.get("PG_BIN"):
        candidates.append(Path(os.environ["PG_BIN"]))

    def major(path: Path) -> tuple[int, ...]:
        # "16", "9.6": compared as numbers, so 16 beats 9.6
        return tuple(int(p) for p in path.parent.name.split(".") if p.isdigit())

    candidates += sorted((Path(p) for p in glob.glob(DEBIAN_BIN_GLOB)), key=major, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in SERVER_BINARIES):
            return directory
    return None


def clean_env() -> dict[str, str]:
    """Our environment without the caller's PG* variables (PGDATA, PGPORT, PGHOST, PGUSER...),
    which would otherwise steer initdb, pg_ctl or pgbench away from our server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"  # initdb checks the locale; C is always there
    return env


def _conf_quote(value: str) -> str:
    """A postgresql.conf value, single-quoted (valid for every type; '' escapes a quote)."""
    return "'" + value.replace("'", "''") + "'"


def server_account() -> pwd.struct_passwd | None:
    """The account the server runs as: None for ourselves, ``postgres`` when we are root."""
    return system_account(SYSTEM_USER, PgServerError, "Debian's postgresql package")


class PgServer:
    """One throwaway PostgreSQL cluster. ``start()``/``stop()`` or use it as a context manager."""

    host = "127.0.0.1"

    def __init__(self, bin_dir: Path | None = None, settings: Mapping[str, str] | None = None) -> None:
        """``settings`` override or add to SERVER_SETTINGS (a benchmark wants more shared_buffers)."""
        found = bin_dir or find_bin_dir()
        if found is None:
            raise PgServerError(
                "no PostgreSQL server binaries (initdb, pg_ctl, postgres) in "
                f"{DEBIAN_BIN_GLOB}, $PG_BIN or the PATH: apt-get install postgresql"
            )
        self.bin_dir: Path = found
        self.settings = {**SERVER_SETTINGS, **(settings or {})}
        self.port: int = 0
        self.base_dir: Path | None = None
        self._run_as = server_account()
        self._watchdog: subprocess.Popen[bytes] | None = None

    # -- paths ---------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._base / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base / "sock"

    @property
    def log_path(self) -> Path:
        return self._base / "server.log"

    @property
    def _base(self) -> Path:
        if self.base_dir is None:
            raise PgServerError("the server has not been started")
        return self.base_dir

    # -- the public surface -----------------------------------------------------------------

    def dsn(self, user: str = SUPERUSER, dbname: str = DATABASE, password: str | None = None) -> str:
        """A libpq URI (psycopg, asyncpg, psql and pgbench all take it) for 127.0.0.1:port."""
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def start(self) -> PgServer:
        if self.base_dir is not None:
            raise PgServerError("already started")
        self.base_dir = make_base_dir("pointsman-pg-", self._run_as, ["sock"])
        self._watchdog = start_watchdog(self.data_dir / "postmaster.pid", self.base_dir)
        try:
            self._initdb()
            self._start_on_a_free_port()
        except BaseException:
            stop_watchdog(self._watchdog)
            self._remove_base_dir()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (if running) and delete its directory. Safe to call twice."""
        if self.base_dir is None:
            return
        stop_watchdog(self._watchdog)
        self._watchdog = None
        try:
            if self.port and (self.data_dir / "postmaster.pid").exists():
                # immediate: no shutdown checkpoint; the data is about to be deleted anyway.
                self._run(self._tool("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "immediate", "-w", check=False)
        finally:
            self._remove_base_dir()
            self.port = 0

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- setup ---------------------------------------------------------------------------------

    def _remove_base_dir(self) -> None:
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def _tool(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a server binary as the server's user, in the base dir (runuser keeps our cwd, and
        postgres warns when it cannot read it: /root, say)."""
        prefix = ["runuser", "-u", self._run_as.pw_name, "--"] if self._run_as is not None else []
        proc = subprocess.run(
            [*prefix, *args],
            input=input,
            capture_output=True,
            text=True,
            cwd=self._base,
            timeout=timeout,
            env=clean_env(),
        )
        if check and proc.returncode != 0:
            raise PgServerError(f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}".rstrip())
        return proc

    def _initdb(self) -> None:
        self._run(
            self._tool("initdb"),
            "-D", str(self.data_dir),
            "-U", SUPERUSER,
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",  # one of the slowest parts of initdb, and pointless here
        )  # fmt: skip
        settings = {**self.settings, "unix_socket_directories": str(self.socket_dir)}
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/pgserver.py (later lines win over the defaults above)\n")
            conf.writelines(f"{key} = {_conf_quote(value)}\n" for key, value in settings.items())
        (self.data_dir / "pg_hba.conf").write_text(PG_HBA)
        # exit_on_error: single-user mode otherwise logs an ERROR and exits 0.
        self._run(
            self._tool("postgres"),
            "--single", "-D", str(self.data_dir), "-c", "exit_on_error=on", "template1",
            input=SETUP_SQL,
        )  # fmt: skip

    def _start_on_a_free_port(self) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            self.log_path.unlink(missing_ok=True)
            proc = self._run(
                self._tool("pg_ctl"),
                "start",
                "-D", str(self.data_dir),
                "-l", str(self.log_path),
                "-o", f"-p {port}",
                "-w", "-t", str(START_TIMEOUT_S),
                check=False,
                timeout=START_TIMEOUT_S + 10,
            )  # fmt: skip
            if proc.returncode == 0:
                self.port = port
                return
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            if not _BIND_FAILURE.search(log) or attempt == START_ATTEMPTS:
                raise PgServerError(
                    f"pg_ctl start on port {port} failed (attempt {attempt}):\n"
                    f"{proc.stdout}{proc.stderr}\nserver log:\n{log}".rstrip()
                )
            # Someone took the port between free_port() and the postmaster's bind: try another.


def pgbench_path(server: PgServer) -> str:
    """pgbench of the server's version when it is next to the server binaries, else the PATH's."""
    local = server.bin_dir / "pgbench"
    if os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("pgbench")
    if found is None:
        raise PgServerError("no pgbench: apt-get install postgresql-client")
    return found


def pgbench_init(server: PgServer, scale: int = 1) -> None:
    """Create and fill pgbench's tables in the ``test`` database (scale 1: 100,000 accounts).

    A client, so it runs as the current user, over TCP like every test client."""
    args = [pgbench_path(server), "-i", "-s", str(scale), "-q", "-h", server.host, "-p", str(server.port)]
    args += ["-U", SUPERUSER, DATABASE]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=clean_env())
    if proc.returncode != 0:
        raise PgServerError(f"pgbench -i failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}".rstrip())


def _serve(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pgserver", description="Run a throwaway PostgreSQL.")
    parser.add_argument("--serve", action="store_true", required=True, help="start, print the port, wait for a signal")
    parser.add_argument("--scale", type=int, default=0, help="run pgbench -i -s SCALE before announcing the port")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a server setting")
    args = parser.parse_args(argv)
    settings = settings_of(parser, args.set)

    def ready(server: PgServer, stopped: threading.Event) -> str:
        if args.scale > 0 and not stopped.is_set():
            pgbench_init(server, args.scale)
        return f"postgres ready on {server.host}:{server.port} in {server.base_dir}"

    return serve("pgserver", lambda: PgServer(settings=settings), ready, errors=(PgServerError,))


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
