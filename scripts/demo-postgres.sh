#!/usr/bin/env bash
# The demo's PostgreSQL server, run by the scheduler as a job (a foreground process it stops
# with SIGTERM):
#
#   scripts/demo-postgres.sh DATADIR PORT
#
# - Finds the server binaries: $PG_BIN if set, else the newest /usr/lib/postgresql/<major>/bin
#   (Debian's layout; `make deps` installs them).
# - When DATADIR holds no cluster yet: initdb (superuser `postgres`, trust authentication on
#   127.0.0.1 only, UTF8, C locale) and a database `demo`. The cluster is built next to DATADIR
#   and renamed into place at the end, so an interrupted first start leaves no half cluster.
# - Then runs postgres in the foreground on 127.0.0.1:PORT only, without a unix socket, logging
#   to stderr. A second start on the same DATADIR reuses the data; a postmaster.pid left by a
#   process that is gone (or whose pid now belongs to something else) is removed first.
#
# Running as root: initdb and postgres refuse to, so they run as the `postgres` system user
# (Debian's package creates it) through `setpriv`, which changes the uid and execs in place
# (runuser would keep a parent process of its own). DATADIR is created and handed to that user;
# every directory above it must be searchable by others (not under /root).
#
# Signals: this script stays the process the scheduler knows and forwards what it receives to
# the postmaster, its child in the same process group. SIGTERM and SIGINT become SIGINT, the
# postmaster's *fast* shutdown: PostgreSQL's own meaning of SIGTERM is a smart shutdown that
# waits for every client to disconnect, and the demo app keeps idle connections open, so it
# would never end before the scheduler's SIGKILL (after which orphaned backends keep the
# shared memory and the next start fails). SIGHUP (reload) and SIGQUIT (immediate shutdown)
# are forwarded as they are. The exit status is the postmaster's (0 after a clean shutdown).
#
# Exit status 2: bad arguments or environment (missing binaries, no postgres user, a DATADIR
# that is not a cluster, the cluster already running).

set -uo pipefail

PROG=demo-postgres
DATABASE=demo
SUPERUSER=postgres
SYSTEM_USER=postgres
BIN_GLOB='/usr/lib/postgresql/*/bin'

say() {
    echo "$PROG: $*" >&2
}

die() {
    say "$*"
    exit 2
}

usage() {
    die "usage: $0 DATADIR PORT"
}

[ $# -eq 2 ] || usage
DATADIR_ARG="$1"
PORT="$2"
[ -n "$DATADIR_ARG" ] || usage
[[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] ||
    die "PORT must be a number between 1 and 65535, not '$PORT'"

# The caller's PG* variables (PGDATA, PGPORT, PGHOST...) must not steer initdb or postgres.
while read -r name; do
    unset "$name"
done < <(compgen -e | grep '^PG' | grep -v '^PG_BIN$')
export LC_ALL=C # initdb checks the locale, C is always there; server messages in English

# -- the binaries ------------------------------------------------------------------------------

has_server_binaries() {
    [ -x "$1/initdb" ] && [ -x "$1/postgres" ]
}

find_bin_dir() {
    if [ -n "${PG_BIN:-}" ]; then
        has_server_binaries "$PG_BIN" ||
            die "PG_BIN=$PG_BIN does not hold the PostgreSQL server binaries (initdb, postgres);" \
                "unset it to use Debian's ('make deps' installs them)"
        echo "$PG_BIN"
        return
    fi
    local dir
    # Newest major first: 16 before 9.6 (sort -V compares the version numerically).
    while read -r dir; do
        if has_server_binaries "$dir"; then
            echo "$dir"
            return
        fi
    done < <(compgen -G "$BIN_GLOB" | sort -t/ -k5,5 -V -r)
    die "no PostgreSQL server binaries (initdb, postgres) in $BIN_GLOB:" \
        "run 'make deps' (installs Debian's postgresql package) or set PG_BIN to their directory"
}

BIN="$(find_bin_dir)" || exit 2
BIN_MAJOR="$("$BIN/postgres" --version | sed -nE 's/.* ([0-9]+)(\.[0-9]+)*.*/\1/p')"

# -- who runs them -----------------------------------------------------------------------------

RUN_AS=() # the prefix that runs a command as the server's user: empty unless we are root
PG_UID="$(id -u)"
PG_GID="$(id -g)"
if [ "$PG_UID" -eq 0 ]; then
    id -u "$SYSTEM_USER" >/dev/null 2>&1 ||
        die "running as root, and PostgreSQL refuses to run as root; there is no '$SYSTEM_USER'" \
            "system user to run it as (Debian's postgresql package creates it; 'make deps')"
    command -v setpriv >/dev/null ||
        die "running as root without setpriv (util-linux) to run PostgreSQL as '$SYSTEM_USER'"
    PG_UID="$(id -u "$SYSTEM_USER")"
    PG_GID="$(id -g "$SYSTEM_USER")"
    RUN_AS=(setpriv --reuid="$PG_UID" --regid="$PG_GID" --init-groups --)
fi

as_pg() {
    "${RUN_AS[@]}" "$@"
}

# -- the data directory ------------------------------------------------------------------------

DATADIR="$(realpath -m -- "$DATADIR_ARG")"
PARENT="$(dirname -- "$DATADIR")"
mkdir -p -- "$PARENT" || die "cannot create $PARENT"
# As root with DATADIR where the postgres user cannot go (a checkout under /root, a private
# temporary directory): keep the cluster in /var/lib/pointsman-demo/<digest of DATADIR> and
# leave a symlink at DATADIR, so the same DATADIR finds the same data on every start.
if [ "$(id -u)" -eq 0 ] && ! as_pg test -x "$PARENT"; then
    digest="$(printf '%s' "$DATADIR" | sha256sum | cut -c1-16)"
    outside="/var/lib/pointsman-demo/$digest"
    mkdir -p -- "$outside" && chmod 755 /var/lib/pointsman-demo "$outside" ||
        die "cannot create $outside for a cluster the '$SYSTEM_USER' user can reach"
    [ -L "$DATADIR" ] || [ ! -e "$DATADIR" ] || die "$DATADIR exists and the '$SYSTEM_USER' user cannot reach it"
    ln -sfn -- "$outside/data" "$DATADIR"
    say "the '$SYSTEM_USER' user cannot reach $PARENT: the cluster lives in $outside/data (linked from $DATADIR)"
    DATADIR="$outside/data"
    PARENT="$outside"
fi
# initdb and postgres complain about a working directory they cannot read (/root, say).
cd -- "$PARENT" || die "cannot enter $PARENT"
as_pg test -x "$PARENT" ||
    die "the '$SYSTEM_USER' user cannot reach $PARENT: every directory above DATADIR must be" \
        "searchable by others (not under /root); pick a DATADIR under /var/lib, /srv or /tmp"

is_cluster() {
    [ -f "$DATADIR/PG_VERSION" ]
}

# pg_hba.conf: read top to bottom, first match wins; nothing but 127.0.0.1 (and the unix socket,
# which is disabled) gets in, and without a password: a laptop demo.
write_hba() {
    cat >"$1/pg_hba.conf" <<'EOF'
# scripts/demo-postgres.sh: trust on 127.0.0.1 only (the server listens nowhere else)
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    all       all   127.0.0.1/32   trust
EOF
}

# Settings for a laptop: small, and durable (fsync and synchronous_commit stay on: with an
# asynchronous commit, a postmaster killed with SIGKILL, as the scheduler does after its
# kill_timeout, loses the commits of its last moments; the test of that case caught it). The
# network settings are also given on the command line at every start, so they hold for any
# cluster.
write_conf() {
    cat >>"$1/postgresql.conf" <<'EOF'

# scripts/demo-postgres.sh (later lines win over the defaults above)
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 50
shared_buffers = '32MB'
min_wal_size = '32MB'
max_wal_size = '256MB'
huge_pages = off
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] %q%u@%d %a: '
log_timezone = 'UTC'
EOF
}

initialize() {
    local tmp
    # Left by a first start that was killed half-way: nothing in there is worth keeping.
    rm -rf -- "$PARENT/.$(basename -- "$DATADIR").initdb."*
    tmp="$PARENT/.$(basename -- "$DATADIR").initdb.$$"
    mkdir -m 0700 -- "$tmp" || die "cannot create $tmp"
    chown "$PG_UID:$PG_GID" "$tmp" || die "cannot hand $tmp to uid $PG_UID"
    # shellcheck disable=SC2064 # expand $tmp now
    trap "rm -rf -- '$tmp'" EXIT
    say "initializing a new cluster in $DATADIR (PostgreSQL $BIN_MAJOR, $BIN)"
    local out
    out="$(as_pg "$BIN/initdb" -D "$tmp" -U "$SUPERUSER" -A trust -E UTF8 --locale=C 2>&1)" ||
        die "initdb failed:"$'\n'"$out"
    write_hba "$tmp"
    write_conf "$tmp"
    # Single-user mode: no network, no client needed. exit_on_error, or an error exits 0.
    out="$(echo "CREATE DATABASE $DATABASE;" |
        as_pg "$BIN/postgres" --single -D "$tmp" -c exit_on_error=on template1 2>&1)" ||
        die "creating the database '$DATABASE' failed:"$'\n'"$out"
    if [ -d "$DATADIR" ]; then
        rmdir -- "$DATADIR" || die "cannot replace the empty directory $DATADIR"
    fi
    mv -T -- "$tmp" "$DATADIR" || die "cannot move the new cluster to $DATADIR"
    trap - EXIT
    say "initialized: database '$DATABASE', superuser '$SUPERUSER', trust on 127.0.0.1"
}

if is_cluster; then
    version="$(cat "$DATADIR/PG_VERSION")"
    [ "$version" = "$BIN_MAJOR" ] ||
        die "$DATADIR holds a PostgreSQL $version cluster but the binaries are $BIN_MAJOR ($BIN):" \
            "set PG_BIN to version $version's, or remove $DATADIR to start afresh"
    owner="$(stat -c %u -- "$DATADIR")"
    [ "$owner" = "$PG_UID" ] ||
        die "$DATADIR belongs to uid $owner, the server runs as uid $PG_UID: chown -R $PG_UID: $DATADIR"
    say "reusing the cluster in $DATADIR"
elif [ -d "$DATADIR" ] && [ -n "$(ls -A -- "$DATADIR")" ]; then
    die "$DATADIR is not empty and holds no PostgreSQL cluster; refusing to touch it"
else
    initialize
fi

# -- a postmaster.pid left behind --------------------------------------------------------------

# postgres removes a lock file whose pid is gone, but refuses one whose pid was reused by
# another process of its user (after a reboot or in a container, pids come back). Ours is stale unless that
# pid is a postmaster working in this data directory (a postmaster's cwd is its data dir).
PIDFILE="$DATADIR/postmaster.pid"
if [ -f "$PIDFILE" ]; then
    pid="$(head -n 1 -- "$PIDFILE" | tr -d ' -')"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
        [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$DATADIR" ]; then
        die "a server already runs on $DATADIR (pid $pid); stop it first"
    fi
    say "removing a stale $PIDFILE (pid ${pid:-?} is not running on it)"
    rm -f -- "$PIDFILE" || die "cannot remove $PIDFILE"
fi

# -- run it ------------------------------------------------------------------------------------

say "starting PostgreSQL $BIN_MAJOR on 127.0.0.1:$PORT (data $DATADIR)"
cd -- "$DATADIR" || die "cannot enter $DATADIR"
# A simple command, not the as_pg function: bash would fork a subshell to run a function and
# $! would be that subshell, not the postmaster (setpriv execs postgres in place).
"${RUN_AS[@]}" "$BIN/postgres" -D "$DATADIR" -p "$PORT" \
    -c listen_addresses=127.0.0.1 -c unix_socket_directories= </dev/null &
postmaster=$!

forward() {
    kill -s "$1" "$postmaster" 2>/dev/null || true
}
trap 'forward INT' TERM INT
trap 'forward HUP' HUP
trap 'forward QUIT' QUIT

# `wait` returns early when a trapped signal arrives: wait again until the postmaster is gone.
status=0
while :; do
    wait "$postmaster"
    status=$?
    kill -0 "$postmaster" 2>/dev/null || break
done
# The last wait may have been the one a signal interrupted (status 128+n) right before the
# postmaster exited: bash still holds its real status then (127: already collected above).
wait "$postmaster" 2>/dev/null
last=$?
[ "$last" -eq 127 ] || status=$last
say "postgres exited with status $status"
exit "$status"
