#!/usr/bin/env bash
# Install the Debian packages whose programs the tests (or `make run`) need, when they are missing.
#
#   scripts/ensure-debian-packages.sh CHECK:PACKAGE ...
#
# CHECK is a command name (looked up with `command -v`) or an absolute path, possibly a glob
# (some match must be executable): the PostgreSQL server binaries live in
# /usr/lib/postgresql/<major>/bin, which is not on the PATH and whose version we do not know.
#
#   scripts/ensure-debian-packages.sh '/usr/lib/postgresql/*/bin/initdb:postgresql' psql:postgresql-client
#
# As root: `apt-get install -y --no-install-recommends` the missing packages; `apt-get update`
# only when that fails (a fresh image has no package lists; an up-to-date one needs no network
# round trip). As anyone else: say what is missing and carry on. Either way the exit status is
# 0 unless the arguments are wrong: a missing program is not a build failure, the tests that
# need it skip themselves (and fail under CI=1, where a missing package must be noticed).
#
# Note: Debian's postgresql package creates and starts a "main" cluster on port 5432 when it
# is installed. The tests do not need it (they start their own, tests/pgserver.py) and leave
# it alone. Debian's prometheus package likewise starts a server on :9090 when it can; the
# tests run their own on a free port (tests/pointsman/test_prometheus.py), so when this script
# has just installed it, the packaged service is stopped if the install started it (see
# STOP_AFTER_INSTALL). A prometheus installed before is never touched. The same goes for
# Debian's mariadb-server, which starts a server on :3306 (the "mariadb" service): the tests
# run their own on a free port (tests/mysqlserver.py).

set -euo pipefail

say() {
    echo "ensure-debian-packages: $*" >&2
}

# Packages whose install starts a system service that nothing here uses (it would only hold a
# port and memory): stopped when this script has just installed them. PACKAGE, or
# PACKAGE:SERVICE when the service has another name.
STOP_AFTER_INSTALL=(prometheus mariadb-server:mariadb)

# stop_service NAME: stop the service NAME if it runs (systemd, else its init script).
stop_service() {
    local name="$1"
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$name" 2>/dev/null; then
        say "stopping the $name service its package started (not used here)"
        systemctl stop "$name" >&2 || say "warning: systemctl stop $name failed"
    elif command -v service >/dev/null 2>&1 && service "$name" status >/dev/null 2>&1; then
        say "stopping the $name service its package started (not used here)"
        service "$name" stop >&2 || say "warning: service $name stop failed"
    fi
}

# present CHECK: whether the program CHECK names is there.
present() {
    local check="$1" match
    if [[ "$check" == /* ]]; then
        # Unquoted on purpose: expand the glob. No match leaves the pattern itself, not executable.
        for match in $check; do
            [[ -x "$match" ]] && return 0
        done
        return 1
    fi
    command -v "$check" >/dev/null 2>&1
}

(($# > 0)) || {
    say "usage: $0 CHECK:PACKAGE ..."
    exit 2
}

missing=()
packages=()
for item in "$@"; do
    [[ "$item" == *:* ]] || {
        say "'$item' is not CHECK:PACKAGE"
        exit 2
    }
    check="${item%:*}"
    package="${item##*:}"
    if ! present "$check"; then
        missing+=("$check")
        # One package can provide several checks (psql and pgbench): list it once.
        [[ " ${packages[*]-} " == *" $package "* ]] || packages+=("$package")
    fi
done
((${#missing[@]} == 0)) && exit 0

if ((EUID != 0)) || ! command -v apt-get >/dev/null 2>&1; then
    why="not root"
    ((EUID == 0)) && why="no apt-get on this machine"
    say "missing: ${missing[*]}"
    say "cannot install ${packages[*]} ($why); as root: apt-get install -y --no-install-recommends ${packages[*]}"
    say "the tests that need them will be skipped (and fail when CI is set)"
    exit 0
fi

say "installing ${packages[*]} (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends "${packages[@]}" >&2; then
    say "install failed; refreshing the package lists and trying again"
    apt-get update >&2 || true
    if ! apt-get install -y --no-install-recommends "${packages[@]}" >&2; then
        say "apt-get install ${packages[*]} failed: the tests that need them will be skipped (and fail when CI is set)"
        exit 0
    fi
fi
for check in "${missing[@]}"; do
    present "$check" || say "warning: $check is still missing after installing ${packages[*]}"
done
for package in "${packages[@]}"; do
    for entry in "${STOP_AFTER_INSTALL[@]}"; do
        if [[ "${entry%%:*}" == "$package" ]]; then
            stop_service "${entry#*:}"
        fi
    done
done
