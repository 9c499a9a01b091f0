"""A throwaway MariaDB server for tests and benchmarks, built from the installed binaries.

    with MySqlServer() as my:               # mariadb-install-db + start on a free 127.0.0.1 port
        pymysql.connect(**my.connect_kwargs())                      # app / apppass, native password
        pymysql.connect(**my.connect_kwargs(ED25519_USER, ED25519_PASSWORD))
        await aiomysql.connect(**my.aiomysql_kwargs(NOPASS_USER, None))
        subprocess.run([*my.client_args(), "-e", "SELECT 1"])       # the mariadb CLI
        my.sql("SELECT 1")                                          # as root, over the socket

    python -m tests.mysqlserver --serve
        start one, print its port on the first line of stdout, run until SIGTERM/SIGINT
        (bench/mysql.sh uses this), then stop it and delete its directory.

What it sets up: a data directory in a temp dir (mariadb-install-db, no test database, root
without a password), mariadbd listening on 127.0.0.1 only, with its unix socket, pid file and
error log in the temp dir (never /run/mysqld, where the machine's own server lives), no option
files read (``--no-defaults``: nothing from /etc/mysql or ~/.my.cnf), and name resolution off.
Then, as ``root`` over the socket: a database ``test`` and three users, all from 127.0.0.1
with ALL on ``test.*`` (so they can create tables: sysbench and mysqlslap run as ``app``), so
tests can check that authentication passes through a proxy untouched:

    app / apppass      mysql_native_password
    eduser / edpass    ed25519 (the auth_ed25519 plugin; when it cannot be installed the user
                       is left out and ``ed25519_error`` says why)
    nopass             no password

``root`` (no password, from 127.0.0.1 and over the socket) is there too, with every right.
Durability is off (no redo log flush at commit, no doublewrite, no fsync) and the buffers are
small: the data is deleted at the end anyway, and install + start take well under a second.

mariadbd refuses to run as root unless told which account to switch to. As root we run
mariadb-install-db as the ``mysql`` system user (Debian's packages create it) through
``runuser`` and hand it the temp dir, and start mariadbd with ``--user=mysql``: it switches
itself, so the process we wait for and signal is mariadbd's own. As anyone else both run as
the current user.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.throwaway import (
    free_port,
    make_base_dir,
    serve,
    settings_of,
    start_watchdog,
    stop_watchdog,
    system_account,
)

APP_USER, APP_PASSWORD = "app", "apppass"  # mysql_native_password
ED25519_USER, ED25519_PASSWORD = "eduser", "edpass"  # ed25519 (when the plugin installs)
NOPASS_USER = "nopass"  # no password at all
SUPERUSER = "root"  # no password, from 127.0.0.1 and over the unix socket
SYSTEM_USER = "mysql"  # the account the server runs as when we are root
DATABASE = "test"

# Where Debian puts them; $MARIADB_BIN (a directory holding all three) wins, then the PATH.
SERVER = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"
CLIENT = "/usr/bin/mariadb"

# Fast and small: a test server holds a few rows (a benchmark a few thousand), and nothing in
# it must survive a crash. Passed to mariadbd as --NAME=VALUE; the innodb ones also to
# mariadb-install-db, whose bootstrap creates the redo log.
SERVER_SETTINGS = {
    "bind-address": "127.0.0.1",
    "skip-name-resolve": "1",
    "max-connections": "200",
    "character-set-server": "utf8mb4",
    "collation-server": "utf8mb4_general_ci",
    "key-buffer-size": "1M",
    "performance-schema": "0",
    "innodb-buffer-pool-size": "32M",
    "innodb-log-file-size": "16M",
    "innodb-log-buffer-size": "4M",
    "innodb-flush-log-at-trx-commit": "0",
    "innodb-doublewrite": "0",
    "innodb-flush-method": "nosync",
    # Skip the buffer pool flush at shutdown: the directory is deleted right after.
    "innodb-fast-shutdown": "3",
    "innodb-buffer-pool-load-at-startup": "0",
    "innodb-buffer-pool-dump-at-shutdown": "0",
    "sync-binlog": "0",
}
_BOOTSTRAP_SETTINGS = ("innodb-buffer-pool-size", "innodb-log-file-size", "innodb-flush-method", "innodb-doublewrite")

START_ATTEMPTS = 5
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30
# What mariadbd logs when another process took the port between our probe and its bind.
_BIND_FAILURE = re.compile(r"Bind on TCP/IP port|Address already in use|another server running on port")


class MySqlServerError(RuntimeError):
    """The server could not be set up or started; the message carries the tool's output."""


@dataclass(frozen=True)
class Binaries:
    server: str  # mariadbd
    install_db: str  # mariadb-install-db
    client: str  # mariadb (also runs the setup SQL)


def find_binaries() -> Binaries | None:
    """mariadbd, mariadb-install-db and the mariadb client, or None when one is missing.

    $MARIADB_BIN (a directory with all three) wins; then Debian's paths; then the PATH."""
    names = {"server": "mariadbd", "install_db": "mariadb-install-db", "client": "mariadb"}
    defaults = {"server": SERVER, "install_db": INSTALL_DB, "client": CLIENT}
    found: dict[str, str] = {}
    override = os.environ.get("MARIADB_BIN")
    for key, name in names.items():
        candidates = [str(Path(override) / name)] if override else []
        candidates.append(defaults[key])
        on_path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
        if on_path:
            candidates.append(on_path)
        path = next((c for c in candidates if os.access(c, os.X_OK)), None)
        if path is None:
            return None
        found[key] = path
    return Binaries(**found)


def clean_env() -> dict[str, str]:
    """Our environment without what steers the server or its clients elsewhere: MYSQL_HOST,
    MYSQL_TCP_PORT, MYSQL_UNIX_PORT, MYSQL_PWD, MARIADB_* ..., and NOTIFY_SOCKET (mariadbd
    would report to systemd as if it were the machine's service)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYSQL", "MARIADB")) and k != "NOTIFY_SOCKET"}
    env["LC_ALL"] = "C"
    return env


def _sql_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _handshake_version(host: str, port: int, timeout: float = 1.0) -> str | None:
    """The server version from the greeting the server sends first on a new connection, or
    None when nothing (or no MySQL greeting) answers yet. Standard library only."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while len(data) < 5 or len(data) < 4 + int.from_bytes(data[:3], "little"):
                chunk = s.recv(4096)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    # 3-byte length, 1-byte sequence, then protocol version 10 and a NUL-terminated version.
    if data[4] != 10:
        return None
    version = data[5 : data.index(b"\0", 5)].decode(errors="replace")
    # MariaDB puts "5.5.5-" in front for clients that compare versions as if it were MySQL.
    return version.removeprefix("5.5.5-")


class MySqlServer:
    """One throwaway MariaDB server. ``start()``/``stop()`` or use it as a context manager."""

    host = "127.0.0.1"

    def __init__(self, binaries: Binaries | None = None, settings: Mapping[str, str] | None = None) -> None:
        """``settings`` override or add to SERVER_SETTINGS (a benchmark wants a bigger buffer pool)."""
        found = binaries or find_binaries()
        if found is None:
            raise MySqlServerError(
                "no MariaDB binaries (mariadbd, mariadb-install-db, mariadb) in /usr/sbin, /usr/bin, "
                "$MARIADB_BIN or the PATH: apt-get install mariadb-server mariadb-client"
            )
        self.binaries: Binaries = found
        self.settings = {**SERVER_SETTINGS, **(settings or {})}
        self.port: int = 0
        self.base_dir: Path | None = None
        self.version: str = ""
        # None once eduser exists; otherwise why it does not (the plugin could not be installed).
        self.ed25519_error: str | None = "the server has not been started"
        self.start_seconds: float = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as = system_account(SYSTEM_USER, MySqlServerError, "Debian's mariadb-server package")
        self._watchdog: subprocess.Popen[bytes] | None = None

    # -- paths ---------------------------------------------------------------------------

    @property
    def tmpdir(self) -> Path:
        """The temp dir holding everything below; deleted by stop()."""
        if self.base_dir is None:
            raise MySqlServerError("the server has not been started")
        return self.base_dir

    @property
    def datadir(self) -> Path:
        return self.tmpdir / "data"

    @property
    def socket_path(self) -> Path:
        return self.tmpdir / "mysqld.sock"

    @property
    def log_path(self) -> Path:
        return self.tmpdir / "server.log"

    @property
    def pid(self) -> int | None:
        """mariadbd's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def ed25519_available(self) -> bool:
        return self.ed25519_error is None

    # -- the public surface -----------------------------------------------------------------

    def users(self) -> dict[str, str | None]:
        """The users a client may log in as over TCP, with their passwords (None: no password)."""
        users: dict[str, str | None] = {APP_USER: APP_PASSWORD, NOPASS_USER: None, SUPERUSER: None}
        if self.ed25519_available:
            users[ED25519_USER] = ED25519_PASSWORD
        return users

    def connect_kwargs(
        self, user: str = APP_USER, password: str | None = APP_PASSWORD, database: str | None = DATABASE
    ) -> dict[str, Any]:
        """Keyword arguments for ``pymysql.connect`` to 127.0.0.1:port (no password: pass None)."""
        kwargs: dict[str, Any] = {"host": self.host, "port": self.port, "user": user, "password": password or ""}
        if database is not None:
            kwargs["database"] = database
        return kwargs

    def aiomysql_kwargs(
        self, user: str = APP_USER, password: str | None = APP_PASSWORD, database: str | None = DATABASE
    ) -> dict[str, Any]:
        """The same for ``aiomysql.connect``, which calls the database ``db``."""
        kwargs = self.connect_kwargs(user, password, database)
        if "database" in kwargs:
            kwargs["db"] = kwargs.pop("database")
        return kwargs

    def client_args(
        self, user: str = APP_USER, password: str | None = APP_PASSWORD, database: str | None = DATABASE
    ) -> list[str]:
        """argv for the ``mariadb`` CLI over TCP to this server; append ``-e SQL`` or feed stdin.
        Run it with ``env=clean_env()`` so no MYSQL_* variable of the caller interferes."""
        args = [self.binaries.client, "--no-defaults", "--protocol=TCP", "-h", self.host, "-P", str(self.port)]
        args += ["-u", user]
        args.append(f"--password={password}" if password else "--skip-password")
        if database is not None:
            args.append(f"--database={database}")
        return args

    def sql(self, statements: str, database: str | None = None) -> str:
        """Run SQL as root over the unix socket with the mariadb CLI; its output, tab-separated
        without column names. Raises MySqlServerError when a statement fails."""
        if self.pid is None:
            raise MySqlServerError("the server is not running")
        args = [self.binaries.client, "--no-defaults", "--protocol=SOCKET", f"--socket={self.socket_path}"]
        args += ["-u", SUPERUSER, "--skip-password", "--batch", "--skip-column-names"]
        if database is not None:
            args.append(f"--database={database}")
        proc = subprocess.run(args, input=statements, capture_output=True, text=True, timeout=60, env=clean_env())
        if proc.returncode != 0:
            raise MySqlServerError(f"mariadb exited with {proc.returncode} on:\n{statements}\n{proc.stderr}".rstrip())
        return proc.stdout

    def start(self) -> MySqlServer:
        if self.base_dir is not None:
            raise MySqlServerError("already started")
        began = time.monotonic()
        self.base_dir = make_base_dir("pointsman-my-", self._run_as)
        self._watchdog = start_watchdog(self.base_dir / "mysqld.pid", self.base_dir)
        try:
            self._install_db()
            self._start_on_a_free_port()
            self._set_up()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop the server (if running) and delete its directory. Safe to call twice."""
        stop_watchdog(self._watchdog)
        self._watchdog = None
        try:
            self._stop_process()
        finally:
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = None
            self.port = 0

    def __enter__(self) -> MySqlServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- setup ---------------------------------------------------------------------------------

    def _server_options(self, names: Sequence[str] | None = None) -> list[str]:
        items = self.settings.items() if names is None else ((n, self.settings[n]) for n in names)
        return [f"--{name}={value}" for name, value in items]

    def _install_db(self) -> None:
        """Create the system tables (mariadbd --bootstrap under the hood), as the server's user."""
        prefix = ["runuser", "-u", self._run_as.pw_name, "--"] if self._run_as is not None else []
        args = [
            self.binaries.install_db,
            "--no-defaults",  # must come first
            f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal",  # root without a password, not unix_socket
            "--skip-test-db",
            "--skip-name-resolve",
            *self._server_options(_BOOTSTRAP_SETTINGS),
        ]
        server_dir = str(Path(self.binaries.server).parent)
        if server_dir not in ("/usr/sbin", "/usr/bin"):
            args.append(f"--basedir={Path(server_dir).parent}")
        # runuser keeps our cwd, which the mysql user may not be able to read (/root, say).
        proc = subprocess.run(
            [*prefix, *args], capture_output=True, text=True, cwd=self.tmpdir, timeout=120, env=clean_env()
        )
        if proc.returncode != 0:
            raise MySqlServerError(
                f"mariadb-install-db exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}".rstrip()
            )

    def _start_on_a_free_port(self) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            self.log_path.unlink(missing_ok=True)
            args = [
                self.binaries.server,
                "--no-defaults",  # must come first
                f"--datadir={self.datadir}",
                f"--socket={self.socket_path}",
                f"--pid-file={self.tmpdir / 'mysqld.pid'}",
                f"--log-error={self.log_path}",
                f"--tmpdir={self.tmpdir}",
                f"--port={port}",
                *self._server_options(),
            ]
            if self._run_as is not None:
                args.append(f"--user={self._run_as.pw_name}")  # mariadbd switches to it itself
            # Its own session: a Ctrl-C in the terminal reaches us, and we stop the server.
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=self.tmpdir,
                env=clean_env(),
                start_new_session=True,
            )
            deadline = time.monotonic() + START_TIMEOUT_S
            while self._proc.poll() is None and time.monotonic() < deadline:
                version = _handshake_version(self.host, port)
                # The port answers the greeting; also wait for the socket, which setup uses.
                if version is not None and self.socket_path.exists():
                    self.port = port
                    self.version = version
                    return
                time.sleep(0.02)
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            exited = self._proc.poll() is not None
            self._stop_process()
            if not exited:
                raise MySqlServerError(f"mariadbd not ready on port {port} after {START_TIMEOUT_S}s:\n{log}".rstrip())
            if not _BIND_FAILURE.search(log) or attempt == START_ATTEMPTS:
                raise MySqlServerError(f"mariadbd on port {port} exited (attempt {attempt}):\n{log}".rstrip())
            # Someone took the port between free_port() and mariadbd's bind: try another.

    def _set_up(self) -> None:
        """The database and the users (see the module's docstring), as root over the socket."""
        grantees = [APP_USER, NOPASS_USER]
        self.sql(
            f"CREATE DATABASE {DATABASE};\n"
            f"CREATE USER '{APP_USER}'@'127.0.0.1' IDENTIFIED VIA mysql_native_password "
            f"USING PASSWORD({_sql_quote(APP_PASSWORD)});\n"
            f"CREATE USER '{NOPASS_USER}'@'127.0.0.1';\n"
        )
        try:
            # INSTALL SONAME fails when the plugin is already there (a packaged default, say).
            installed = self.sql("SELECT COUNT(*) FROM information_schema.plugins WHERE plugin_name = 'ed25519'")
            if installed.strip() == "0":
                self.sql("INSTALL SONAME 'auth_ed25519';")
            self.sql(
                f"CREATE USER '{ED25519_USER}'@'127.0.0.1' IDENTIFIED VIA ed25519 "
                f"USING PASSWORD({_sql_quote(ED25519_PASSWORD)});"
            )
        except MySqlServerError as exc:
            self.ed25519_error = str(exc)
        else:
            self.ed25519_error = None
            grantees.append(ED25519_USER)
        self.sql("".join(f"GRANT ALL ON {DATABASE}.* TO '{user}'@'127.0.0.1';\n" for user in grantees))

    def _stop_process(self) -> None:
        """SIGTERM (a clean shutdown; innodb-fast-shutdown=3 makes it quick), SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _serve(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mysqlserver", description="Run a throwaway MariaDB.")
    parser.add_argument("--serve", action="store_true", required=True, help="start, print the port, wait for a signal")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a mariadbd option")
    args = parser.parse_args(argv)
    settings = {name.replace("_", "-"): value for name, value in settings_of(parser, args.set).items()}

    def ready(server: MySqlServer, stopped: threading.Event) -> str:
        ed25519 = "yes" if server.ed25519_available else f"no ({server.ed25519_error})"
        return (
            f"mariadb {server.version} ready on {server.host}:{server.port} in {server.base_dir} "
            f"({server.start_seconds:.2f}s; ed25519 user: {ed25519})"
        )

    return serve(
        "mysqlserver",
        lambda: MySqlServer(settings=settings),
        ready,
        alive=lambda server: server.pid is not None,
        errors=(MySqlServerError,),
    )


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
