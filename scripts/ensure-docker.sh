#!/usr/bin/env bash
# Make a Docker engine reachable for the docker driver's tests (and `make run` with docker jobs).
#
#   scripts/ensure-docker.sh
#
# Idempotent. If `docker info` already works there is nothing to do. Otherwise, as root:
#   - install Debian's docker.io and busybox-static when missing (`apt-get update` only when the
#     install fails: a fresh image has no package lists);
#   - remove a stale /var/run/docker.pid whose process is not a live dockerd;
#   - start dockerd without systemd (cgroupfs driver, overlay2, no iptables/forwarding/masquerade,
#     which containers publishing on 127.0.0.1 do not need), detached with setsid, logging to
#     /var/log/pointsman-dockerd.log;
#   - wait up to 15 s for `docker info`.
# Not root, or the engine will not start: say why on stderr and exit 0. A missing engine is not a
# build failure; the tests that need it skip with that reason.

set -uo pipefail

LOG=/var/log/pointsman-dockerd.log
PIDFILE=/var/run/docker.pid

say() {
    echo "ensure-docker: $*" >&2
}

engine_ok() {
    command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1
}

if engine_ok; then
    exit 0
fi

if [[ -n "${DOCKER_HOST:-}" && "${DOCKER_HOST}" != unix:///var/run/docker.sock && "${DOCKER_HOST}" != unix:///run/docker.sock ]]; then
    say "DOCKER_HOST=${DOCKER_HOST} does not answer \`docker info\` (not starting a local dockerd for it); docker tests will skip"
    exit 0
fi

if [[ "$(id -u)" != 0 ]]; then
    say "no Docker engine reachable and not root: cannot install or start dockerd; docker tests will skip"
    exit 0
fi

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
[[ -x /bin/busybox || -x /usr/bin/busybox ]] || missing+=(busybox-static)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        if ! { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1; }; then
            say "apt-get install ${missing[*]} failed; docker tests will skip"
            exit 0
        fi
    fi
fi

if ! command -v dockerd >/dev/null 2>&1; then
    say "dockerd not found after installing docker.io; docker tests will skip"
    exit 0
fi

# A pid file left by a dockerd that is gone (or whose pid was reused) makes dockerd refuse to start.
if [[ -f "$PIDFILE" ]]; then
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    if [[ -z "$pid" ]] || ! [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]]; then
        say "removing stale $PIDFILE (pid '${pid}' is not a live dockerd)"
        rm -f "$PIDFILE"
    fi
fi

if pgrep -x dockerd >/dev/null 2>&1; then
    say "dockerd is already running but \`docker info\` fails; waiting for it"
else
    say "starting dockerd (log: $LOG)"
    setsid dockerd --exec-opt native.cgroupdriver=cgroupfs --storage-driver overlay2 \
        --iptables=false --ip-forward=false --ip-masq=false >>"$LOG" 2>&1 </dev/null &
    disown || true
fi

for _ in $(seq 1 60); do
    if engine_ok; then
        say "docker engine ready"
        exit 0
    fi
    sleep 0.25
done

say "dockerd did not answer \`docker info\` within 15 s (see $LOG); docker tests will skip"
tail -n 5 "$LOG" >&2 2>/dev/null || true
exit 0
