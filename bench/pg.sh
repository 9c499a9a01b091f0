#!/usr/bin/env bash
# PostgreSQL benchmark: pgbench against a throwaway PostgreSQL directly, through pgbouncer
# (session mode) and through pointsman (a `protocol: postgres` listener with a deny policy),
# in one run, with the ratios pointsman/direct and pointsman/pgbouncer checked against the
# floors. See bench/README.md.
#
#   bash bench/pg.sh                                   # DURATION=15 WARMUP=2 CLIENTS=8 THREADS=2
#   DURATION=3 TARGETS="direct pgbouncer" bash bench/pg.sh
#
# Environment: DURATION (s per measured run), WARMUP (s of pgbench before each measured run),
# CLIENTS / THREADS (pgbench -c / -j), SCALE (pgbench -i -s), SHARED_BUFFERS (the server's),
# WORKLOADS (any of select select-prepared tpcb), TARGETS (any of direct haproxy pgbouncer
# pointsman; haproxy is a plain TCP forwarder: the price of the extra hop alone),
# CORE_PROXY / CORE_LOAD, OUT_DIR (default bench/out), KEEP_TMP=1.
# Exit status: 0 all floors met, 1 a floor was missed, 2 the benchmark could not run (also
# when pointsman refused its config: the table for the other targets is printed first).

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DURATION="${DURATION:-15}"
WARMUP="${WARMUP:-2}"
CLIENTS="${CLIENTS:-8}"
THREADS="${THREADS:-2}"
# Scale 10 (1M accounts, ~150 MB) rather than 1: TPC-B-like transactions all update one of
# SCALE pgbench_branches rows, so with 8 clients and scale 1 they would mostly queue on a row
# lock and measure lock waits, not the path through the proxy.
SCALE="${SCALE:-10}"
SHARED_BUFFERS="${SHARED_BUFFERS:-256MB}"  # the whole data set, so -S never reads the page cache
WORKLOADS="${WORKLOADS:-select select-prepared tpcb}"
TARGETS="${TARGETS:-direct haproxy pgbouncer pointsman}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/bench/out}"

# Every client connects explicitly (-h 127.0.0.1 -p PORT -U postgres, database test): none of
# the caller's libpq variables may send it elsewhere or add TLS, passwords or options.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGPASSWORD PGPASSFILE PGSERVICE PGSSLMODE PGOPTIONS
export PGCONNECT_TIMEOUT=5

# common.sh's check_targets knows the HTTP/TCP targets (haproxy); this one has pgbouncer.
for t in $TARGETS; do
    case "$t" in
        direct | haproxy | pgbouncer | pointsman) ;;
        *) die "unknown target '$t' in TARGETS (use direct, haproxy, pgbouncer, pointsman)" ;;
    esac
done
[[ " $TARGETS " == *" pointsman "* ]] && require_pointsman
for w in $WORKLOADS; do
    case "$w" in
        select | select-prepared | tpcb) ;;
        *) die "unknown workload '$w' in WORKLOADS (use select, select-prepared, tpcb)" ;;
    esac
done
require_python

# The server binaries live in /usr/lib/postgresql/<major>/bin, which ensure_tools (PATH and
# /usr/sbin) cannot see: the script `make test` uses knows globs. It only warns when it cannot
# install; tests/pgserver.py then says clearly what is missing.
bash "$REPO_ROOT/scripts/ensure-debian-packages.sh" '/usr/lib/postgresql/*/bin/initdb:postgresql'
ensure_tools psql:postgresql-client pgbench:postgresql-client curl:curl
[[ " $TARGETS " == *" haproxy "* ]] && ensure_tools haproxy:haproxy
if [[ " $TARGETS " == *" pgbouncer "* ]]; then
    had_pgbouncer=1
    if ! command -v pgbouncer >/dev/null 2>&1 && [[ ! -x /usr/sbin/pgbouncer ]]; then
        had_pgbouncer=0
    fi
    ensure_tools pgbouncer:pgbouncer
    # Debian's package starts its own pgbouncer (127.0.0.1:6432) on install; ours runs from
    # our own config, and the packaged one should not sit on a core during the benchmark.
    if ((had_pgbouncer == 0)); then
        { command -v systemctl >/dev/null 2>&1 && systemctl stop pgbouncer >/dev/null 2>&1; } ||
            { command -v service >/dev/null 2>&1 && service pgbouncer stop >/dev/null 2>&1; } || true
    fi
fi
PGBOUNCER="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
bench_init

read -r BOUNCER_PORT PM_PORT ADMIN_PORT HAP_PORT <<<"$(free_ports 4)"
CLK_TCK="$(getconf CLK_TCK)"
RESULTS="$BENCH_TMP/results.tsv"
CACHE="$BENCH_TMP/cache.tsv"
: >"$RESULTS"
: >"$CACHE"
NOTE="$(load_note)"
log "$NOTE"
log "DURATION=${DURATION}s WARMUP=${WARMUP}s CLIENTS=$CLIENTS THREADS=$THREADS SCALE=$SCALE WORKLOADS='$WORKLOADS' TARGETS='$TARGETS' tmp=$BENCH_TMP"

# Neither PostgreSQL nor pgbouncer runs as root. As root, pgbouncer runs as the postgres
# account through setpriv, which execs (runuser forks and waits): the pid we record is then
# pgbouncer's own, so its CPU time is what measure_end reads. It needs to reach its files.
AS_SERVICE=()
if ((EUID == 0)); then
    id postgres >/dev/null 2>&1 || die "running as root and there is no 'postgres' user to run pgbouncer as"
    AS_SERVICE=(setpriv --reuid=postgres --regid=postgres --init-groups --)
    chmod o+x "$BENCH_TMP"
fi

# --- the server: tests/pgserver.py, on the load core with pgbench --------------------------
# It prints the port on its first line of output once pgbench's tables are filled, and stops
# the server and deletes its directory on SIGTERM (what stop_pid sends).
log "starting PostgreSQL (initdb, pgbench -i -s $SCALE)"
start_bg pgserver "$CORE_LOAD" "$PY" -m tests.pgserver --serve --scale "$SCALE" \
    --set "shared_buffers=$SHARED_BUFFERS" --set max_wal_size=4GB
SERVER_PID=$LAST_PID
PG_PORT=""
deadline=$((SECONDS + 300))
while [[ -z "$PG_PORT" ]]; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "bench: the PostgreSQL server did not start; its output:" >&2
        sed 's/^/    /' "$BENCH_TMP/pgserver.log" >&2
        exit 2
    fi
    ((SECONDS < deadline)) || die "PostgreSQL not ready after 300 s (see $BENCH_TMP/pgserver.log, KEEP_TMP=1)"
    sleep 0.2
    PG_PORT="$(grep -m1 -E '^[0-9]+$' "$BENCH_TMP/pgserver.log" || true)"
done
log "PostgreSQL on 127.0.0.1:$PG_PORT"

# psql_at PORT ARGS...: psql over TCP as the superuser (trust) to database test, one value a line.
psql_at() {
    local port="$1"
    shift
    timeout 30 psql -h 127.0.0.1 -p "$port" -U postgres -X -A -t -q -d test "$@"
}

# check_pg NAME PORT: the target answers a query on pgbench's tables.
check_pg() {
    local name="$1" port="$2" got
    got="$(psql_at "$port" -c "SELECT count(*) FROM pgbench_branches" 2>&1)" || true
    if [[ "$got" != "$SCALE" ]]; then
        echo "bench: $name answered '$got' to SELECT count(*) FROM pgbench_branches (want '$SCALE')" >&2
        return 1
    fi
}

# What pgbench does before a run unless -n. We pass -n and do it here, directly on the server,
# for every target alike: its TRUNCATE would be refused by pointsman's deny rule (by design),
# and it keeps the history table from growing across runs.
reset_tables() {
    psql_at "$PG_PORT" -c "VACUUM pgbench_branches" -c "VACUUM pgbench_tellers" -c "TRUNCATE pgbench_history" \
        >/dev/null || die "could not reset pgbench's tables"
}

workload_args() {
    case "$1" in
        select) echo "-S" ;;
        select-prepared) echo "-S -M prepared" ;;
        tpcb) echo "" ;;
    esac
}

# measure TARGET PORT PID: per workload, a warm-up run then a measured run, pgbench pinned to
# the load core.
measure() {
    local target="$1" port="$2" pid="$3" workload out args
    for workload in $WORKLOADS; do
        args="$(workload_args "$workload")"
        out="$BENCH_TMP/pgbench-$target-$workload.txt"
        reset_tables
        log "$target $workload: warm-up ${WARMUP}s, then ${DURATION}s, $CLIENTS clients"
        if ((WARMUP > 0)); then
            # shellcheck disable=SC2086
            taskset -c "$CORE_LOAD" pgbench -h 127.0.0.1 -p "$port" -U postgres -n -c "$CLIENTS" -j "$THREADS" \
                -T "$WARMUP" $args test >/dev/null 2>&1 ||
                { echo "bench: pgbench (warm-up) failed against $target" >&2; return 1; }
        fi
        [[ "$target" == pointsman ]] && scrape_metrics "$BENCH_TMP/metrics-$workload-before.txt"
        measure_begin "$pid"
        # shellcheck disable=SC2086
        taskset -c "$CORE_LOAD" pgbench -h 127.0.0.1 -p "$port" -U postgres -n -c "$CLIENTS" -j "$THREADS" \
            -T "$DURATION" $args test >"$out" 2>&1 || {
            echo "bench: pgbench failed against $target:" >&2
            sed 's/^/    /' "$out" >&2
            return 1
        }
        measure_end "$pid" "$target" "$workload" "$out"
        if [[ "$target" == pointsman ]]; then
            scrape_metrics "$BENCH_TMP/metrics-$workload-after.txt"
            printf '%s\t%s\t%s\n' "$workload" "$BENCH_TMP/metrics-$workload-before.txt" \
                "$BENCH_TMP/metrics-$workload-after.txt" >>"$CACHE"
        fi
        check_alive "$pid" "${logname:-$target}" || return 1
    done
}

# pgbouncer in session mode (one server connection per client for the client's lifetime: the
# mode pointsman's postgres listener corresponds to), one process, no per-connection logging.
# trust: pgbouncer still looks the user up in auth_file.
write_pgbouncer_config() {
    mkdir -p "$BENCH_TMP/pgbouncer"
    echo '"postgres" ""' >"$BENCH_TMP/pgbouncer/userlist.txt"
    cat >"$BENCH_TMP/pgbouncer/pgbouncer.ini" <<EOF
[databases]
test = host=127.0.0.1 port=$PG_PORT dbname=test

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $BENCH_TMP/pgbouncer/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 50
log_connections = 0
log_disconnections = 0
log_stats = 0
stats_period = 3600
EOF
    ((EUID == 0)) && chown -R postgres: "$BENCH_TMP/pgbouncer"
    return 0
}

# drop_canary PORT: a DROP through the target (it must fail: the policy refuses it).
drop_canary() {
    psql_at "$1" -c "DROP TABLE IF EXISTS pointsman_bench_canary"
}

for target in $TARGETS; do
    case "$target" in
        direct)
            check_pg PostgreSQL "$PG_PORT" || exit 2
            logname=pgserver measure direct "$PG_PORT" "$SERVER_PID" || exit 2
            ;;
        haproxy)
            sql_haproxy_target "$PG_PORT" check_pg || exit 2
            ;;
        pgbouncer)
            write_pgbouncer_config
            start_bg pgbouncer "$CORE_PROXY" "${AS_SERVICE[@]}" "$PGBOUNCER" "$BENCH_TMP/pgbouncer/pgbouncer.ini"
            pid=$LAST_PID
            wait_port "$BOUNCER_PORT" "$pid" pgbouncer || exit 2
            check_pg pgbouncer "$BOUNCER_PORT" || exit 2
            measure pgbouncer "$BOUNCER_PORT" "$pid" || exit 2
            stop_bg "$pid"
            ;;
        pointsman)
            sql_pointsman_target postgres "$PG_PORT" check_pg drop_canary || exit 2
            ;;
    esac
done

stamp="$(date +%Y%m%d-%H%M%S)"
conditions="DURATION=${DURATION}s WARMUP=${WARMUP}s pgbench -c $CLIENTS -j $THREADS, scale $SCALE, shared_buffers $SHARED_BUFFERS; $NOTE"
status=0
if [[ -s "$RESULTS" ]]; then
    set +e
    "$PY" "$REPO_ROOT/bench/pg_report.py" "$RESULTS" --cache "$CACHE" --conditions "$conditions" | tee "$BENCH_TMP/table.txt"
    status=${PIPESTATUS[0]}
    set -e
fi
if ((POINTSMAN_FAILED)); then
    echo "pointsman: not measured, it refused the config (see above)" | tee -a "$BENCH_TMP/table.txt" >&2
    status=2
fi
if mkdir -p "$OUT_DIR/pg-$stamp" 2>/dev/null; then
    cp "$BENCH_TMP"/table.txt "$BENCH_TMP"/pgbench-*.txt "$OUT_DIR/pg-$stamp/" 2>/dev/null || true
    cp "$BENCH_TMP"/pointsman.yaml "$BENCH_TMP"/pointsman-metrics.txt "$BENCH_TMP"/pgbouncer/pgbouncer.ini "$BENCH_TMP"/haproxy.cfg \
        "$OUT_DIR/pg-$stamp/" 2>/dev/null || true
    log "table and raw pgbench output saved in ${OUT_DIR#"$REPO_ROOT"/}/pg-$stamp/"
fi
exit "$status"
