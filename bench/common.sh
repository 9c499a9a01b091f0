# Shared helpers for bench/http.sh and bench/tcp.sh (sourced, not run).
#
# Every process a benchmark starts is recorded in BENCH_PIDS and killed by its pid on exit;
# every file lives in one temp dir, removed on exit (KEEP_TMP=1 keeps it for a post-mortem).
# Every wait loop is bounded by a deadline.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

PY="$REPO_ROOT/.venv/bin/python"
POINTSMAN="$REPO_ROOT/.venv/bin/pointsman"
BENCH_PIDS=()
BENCH_TMP=""

# Cores: the proxy under test gets CORE_PROXY to itself; the load generator and the upstream
# share CORE_LOAD. On a 1-core machine both are 0 and the numbers mean little (we say so).
if [[ -z "${CORE_PROXY:-}" || -z "${CORE_LOAD:-}" ]]; then
    if (($(nproc) >= 2)); then
        CORE_PROXY="${CORE_PROXY:-0}"
        CORE_LOAD="${CORE_LOAD:-1}"
    else
        echo "warning: only one CPU; proxy, upstream and load generator share it" >&2
        CORE_PROXY=0
        CORE_LOAD=0
    fi
fi

die() {
    echo "bench: $*" >&2
    exit 2
}

log() {
    echo "[bench $(date +%H:%M:%S)] $*" >&2
}

# require_pointsman: refuse cleanly when the console script is missing.
require_pointsman() {
    if [[ ! -x "$POINTSMAN" ]]; then
        die "$POINTSMAN is missing: run 'make test' or 'make run' first (they create .venv and install pointsman), or set TARGETS to leave pointsman out"
    fi
}

require_python() {
    if [[ ! -x "$PY" ]]; then
        PY="$(command -v python3 || true)"
        [[ -n "$PY" ]] || die "no Python: run 'make test' first to create .venv"
    fi
}

# ensure_tools binary:package ...: install missing binaries from Debian's packages.
ensure_tools() {
    local missing=() pkgs=() item bin pkg
    for item in "$@"; do
        bin="${item%%:*}"
        pkg="${item#*:}"
        if ! command -v "$bin" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$bin" ]]; then
            missing+=("$bin")
            pkgs+=("$pkg")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    if ((EUID != 0)); then
        die "missing ${missing[*]}; install them as root: apt-get install -y ${pkgs[*]}"
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install ${pkgs[*]}"
    log "installing ${pkgs[*]} from Debian's packages (missing: ${missing[*]})"
    # Debian's iperf3 asks whether to start a daemon; noninteractive takes the default (no).
    # Installing a daemon package may start its service: the ones we install are stopped at
    # once so they don't hold a core or a port during the benchmark.
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${pkgs[@]}" >&2; then
        apt-get update >&2 || true
        apt-get install -y --no-install-recommends "${pkgs[@]}" >&2 || die "apt-get install ${pkgs[*]} failed"
    fi
    for pkg in "${pkgs[@]}"; do
        case "$pkg" in
            nginx*) command -v systemctl >/dev/null 2>&1 && systemctl stop nginx >/dev/null 2>&1 || true ;;
            haproxy) command -v systemctl >/dev/null 2>&1 && systemctl stop haproxy >/dev/null 2>&1 || true ;;
        esac
    done
    for bin in "${missing[@]}"; do
        command -v "$bin" >/dev/null 2>&1 || [[ -x "/usr/sbin/$bin" ]] || die "$bin is still missing after installing"
    done
}

bench_init() {
    command -v taskset >/dev/null 2>&1 || ensure_tools taskset:util-linux
    BENCH_TMP="$(mktemp -d /tmp/pointsman-bench.XXXXXX)"
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

stop_pid() {
    local pid="$1" i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do  # 5 s at most, then SIGKILL
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

bench_cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${BENCH_PIDS[@]}"; do
        stop_pid "$pid"
    done
    if [[ -n "$BENCH_TMP" && -d "$BENCH_TMP" ]]; then
        if [[ "${KEEP_TMP:-0}" == 1 ]]; then
            log "kept $BENCH_TMP"
        else
            rm -rf "$BENCH_TMP"
        fi
    fi
    exit "$rc"
}

# free_ports N: N distinct free loopback ports (bound together, then released: a benchmark
# can live with the small race this leaves).
free_ports() {
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# start_bg NAME CORE CMD...: run CMD pinned to CORE, output to $BENCH_TMP/NAME.log; sets
# LAST_PID. `exec` makes the pid the program's own (not a subshell's), so we can read its CPU.
start_bg() {
    local name="$1" core="$2"
    shift 2
    (exec taskset -c "$core" "$@" >"$BENCH_TMP/$name.log" 2>&1) &
    LAST_PID=$!
    BENCH_PIDS+=("$LAST_PID")
}

# stop_bg PID: stop one process we started.
stop_bg() {
    stop_pid "$1"
}

# wait_port PORT PID NAME [SECONDS]: wait until something accepts on 127.0.0.1:PORT; fail
# with NAME's log when PID dies first or the deadline passes.
wait_port() {
    local port="$1" pid="$2" name="$3" seconds="${4:-15}"
    local deadline=$((SECONDS + seconds))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench: $name exited before listening on 127.0.0.1:$port; its output:" >&2
            sed 's/^/    /' "$BENCH_TMP/$name.log" >&2 || true
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "bench: $name did not listen on 127.0.0.1:$port within ${seconds}s; its output:" >&2
    sed 's/^/    /' "$BENCH_TMP/$name.log" >&2 || true
    return 1
}

# check_alive PID NAME: fail with NAME's log when PID is gone (crashed during a run).
check_alive() {
    local pid="$1" name="$2"
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "bench: $name (pid $pid) died; its output:" >&2
        sed 's/^/    /' "$BENCH_TMP/$name.log" >&2 || true
        return 1
    fi
}

# cpu_ticks PID: user+system clock ticks the process (all its threads) has used so far.
cpu_ticks() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || {
        echo 0
        return
    }
    stat="${stat##*) }"  # the command name may hold spaces; fields after it are plain
    # shellcheck disable=SC2086
    set -- $stat
    echo $((${12} + ${13}))  # utime and stime are fields 14 and 15 of the whole line
}

# load_note: what else was running, so a reader can judge the numbers.
load_note() {
    local load
    load="$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "cores: proxy on $CORE_PROXY, load generator + upstream on $CORE_LOAD; $(nproc) CPUs; load average before the run: $load"
}

# core_stat N: "busy total" jiffies of CPU N so far (busy = all but idle and iowait), to tell
# whether a core was saturated during a run and whether someone else was using it.
core_stat() {
    local line
    line="$(grep "^cpu$1 " /proc/stat)"
    # shellcheck disable=SC2086
    set -- $line
    local total=$(($2 + $3 + $4 + $5 + $6 + $7 + $8 + ${9:-0}))
    echo "$((total - $5 - $6)) $total"
}

# busy_pct "BUSY0 TOTAL0" "BUSY1 TOTAL1": how busy a core was between two core_stat samples.
busy_pct() {
    local b0 t0 b1 t1
    read -r b0 t0 <<<"$1"
    read -r b1 t1 <<<"$2"
    if ((t1 > t0)); then
        echo $(((b1 - b0) * 100 / (t1 - t0)))
    else
        echo 0
    fi
}

# measure_begin PID: sample the process's CPU and both cores before a measured run.
measure_begin() {
    M_T0="$(cpu_ticks "$1")"
    M_P0="$(core_stat "$CORE_PROXY")"
    M_L0="$(core_stat "$CORE_LOAD")"
}

# measure_end PID TARGET CASE OUT: sample again and append the run's row to $RESULTS
# (target, case, raw output file, proxy CPU %, proxy core busy %, load core busy %).
measure_end() {
    local pid=$1 target=$2 case=$3 out=$4 t1 p1 l1 cpu
    t1="$(cpu_ticks "$pid")"
    p1="$(core_stat "$CORE_PROXY")"
    l1="$(core_stat "$CORE_LOAD")"
    cpu=$(((t1 - M_T0) * 100 / CLK_TCK / DURATION))
    [[ "$target" == direct ]] && cpu=-
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$case" "$out" "$cpu" \
        "$(busy_pct "$M_P0" "$p1")" "$(busy_pct "$M_L0" "$l1")" >>"$RESULTS"
}

# check_targets: every word of $TARGETS is a known target, and pointsman is installed when
# it is one of them.
check_targets() {
    local t
    for t in $TARGETS; do
        case "$t" in
            direct | haproxy | pointsman) ;;
            *) die "unknown target '$t' in TARGETS (use direct, haproxy, pointsman)" ;;
        esac
    done
    [[ " $TARGETS " == *" pointsman "* ]] && require_pointsman
    return 0
}

# write_tcp_haproxy_config FILE LISTEN_PORT SERVER_PORT: HAProxy as a plain TCP forwarder (one
# thread, as pointsman runs one event loop) from 127.0.0.1:LISTEN_PORT to 127.0.0.1:SERVER_PORT.
# The SQL benchmarks run it beside pointsman: it reads no statement, so its ratio to a direct
# connection is the price of the extra hop alone.
write_tcp_haproxy_config() {
    cat >"$1" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend sql
    bind 127.0.0.1:$2
    default_backend server
backend server
    server db 127.0.0.1:$3
EOF
}

# pointsman_refused LOG PROTOCOL: say that pointsman could not run the benchmark's config
# ($BENCH_TMP/pointsman.yaml), with its output in LOG; sets POINTSMAN_FAILED=1.
POINTSMAN_FAILED=0
pointsman_refused() {
    echo "bench: pointsman could not run the benchmark's config ($BENCH_TMP/pointsman.yaml):" >&2
    sed 's/^/    /' "$BENCH_TMP/pointsman.yaml" >&2
    echo "  its output:" >&2
    sed 's/^/    /' "$1" >&2
    echo "  (a 'protocol: $2' listener needs a pointsman that has one; the other targets' results follow)" >&2
    POINTSMAN_FAILED=1
}

# scrape_metrics FILE: pointsman's /metrics (admin on $ADMIN_PORT), or an empty file when it
# does not answer.
scrape_metrics() {
    curl -s -m 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$1" 2>/dev/null || : >"$1"
}

# The SQL benchmarks' proxy targets. Each script defines `measure TARGET PORT PID` and a CHECK
# function (`CHECK NAME PORT`: the target answers a query on the benchmark's data) and, for
# pointsman, a DROP function (`DROP PORT`: succeeds if a DROP got through). Both return 1 when the benchmark cannot go on.

# sql_haproxy_target SERVER_PORT CHECK: HAProxy in TCP mode on $HAP_PORT, measured.
sql_haproxy_target() {
    local server_port="$1" check="$2" pid
    write_tcp_haproxy_config "$BENCH_TMP/haproxy.cfg" "$HAP_PORT" "$server_port"
    haproxy -c -q -f "$BENCH_TMP/haproxy.cfg" || die "HAProxy refused its config"
    start_bg haproxy "$CORE_PROXY" haproxy -db -f "$BENCH_TMP/haproxy.cfg"
    pid=$LAST_PID
    wait_port "$HAP_PORT" "$pid" haproxy || return 1
    "$check" HAProxy "$HAP_PORT" || return 1
    measure haproxy "$HAP_PORT" "$pid" || return 1
    stop_bg "$pid"
}

# sql_pointsman_target PROTOCOL SERVER_PORT CHECK DROP: `pointsman router` on $PM_PORT (admin
# $ADMIN_PORT) with one PROTOCOL listener in front of 127.0.0.1:SERVER_PORT and a deny policy
# on DROP/TRUNCATE that the workloads never trigger (every statement is classified and
# checked, none refused), the deny rule shown live, measured, its metrics kept. A config it
# refuses is reported (pointsman_refused) and the other targets go on.
sql_pointsman_target() {
    local protocol="$1" server_port="$2" check="$3" drop="$4" pid
    cat >"$BENCH_TMP/pointsman.yaml" <<EOF
admin: {listen: 127.0.0.1:$ADMIN_PORT}
clusters:
  db: {endpoints: ["127.0.0.1:$server_port"]}
listeners:
  - {name: bench, listen: "127.0.0.1:$PM_PORT", protocol: $protocol, to: db, app: bench, policies: [no-drop]}
policies:
  - {name: no-drop, match: {verbs: [DROP, TRUNCATE]}, action: deny}
EOF
    # check-config first: a refused config is reported as such, not as a crash.
    if ! "$POINTSMAN" check-config "$BENCH_TMP/pointsman.yaml" >"$BENCH_TMP/check-config.log" 2>&1; then
        pointsman_refused "$BENCH_TMP/check-config.log" "$protocol"
        return 0
    fi
    start_bg pointsman "$CORE_PROXY" "$POINTSMAN" router --config "$BENCH_TMP/pointsman.yaml"
    pid=$LAST_PID
    if ! wait_port "$PM_PORT" "$pid" pointsman 30 2>/dev/null; then
        pointsman_refused "$BENCH_TMP/pointsman.log" "$protocol"
        stop_bg "$pid"
        return 0
    fi
    "$check" pointsman "$PM_PORT" || return 1
    # The deny rule must be live, or this is not the configuration we claim to measure.
    if "$drop" "$PM_PORT" >"$BENCH_TMP/canary.log" 2>&1; then
        die "pointsman let a DROP through: the no-drop policy is not enforced"
    fi
    measure pointsman "$PM_PORT" "$pid" || return 1
    scrape_metrics "$BENCH_TMP/pointsman-metrics.txt"
    stop_bg "$pid"
}

