#!/usr/bin/env bash
# MySQL benchmark: a read-only point-select workload against a throwaway MariaDB directly,
# through HAProxy (TCP mode: a forwarder that reads no statement, the cost of the extra hop
# alone) and through pointsman (a `protocol: mysql` listener with a deny policy), in one run,
# with the ratio pointsman/direct checked against the floor. See bench/README.md.
#
#   bash bench/mysql.sh                                # DURATION=15 WARMUP=2 CLIENTS=8
#   TARGETS=direct DURATION=3 bash bench/mysql.sh
#
# Environment: DURATION (s per measured run), WARMUP (s before each measured run), CLIENTS
# (concurrent connections), TABLE_SIZE (rows in sbtest1), BUFFER_POOL (the server's
# innodb-buffer-pool-size), WORKLOADS (any of point-select point-select-prepared), TARGETS
# (any of direct haproxy pointsman), TOOL (sysbench, mysqlslap, or auto: sysbench when it can be had),
# CORE_PROXY / CORE_LOAD, OUT_DIR (default bench/out), KEEP_TMP=1.
# Exit status: 0 the floor was met, 1 it was missed, 2 the benchmark could not run (also when
# pointsman refused its config: the table for the other targets is printed first).

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DURATION="${DURATION:-15}"
WARMUP="${WARMUP:-2}"
CLIENTS="${CLIENTS:-8}"
TABLE_SIZE="${TABLE_SIZE:-100000}"
BUFFER_POOL="${BUFFER_POOL:-256M}"  # the whole table, so no point select reads the disk
WORKLOADS="${WORKLOADS:-point-select point-select-prepared}"
TARGETS="${TARGETS:-direct haproxy pointsman}"
TOOL="${TOOL:-auto}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/bench/out}"

# tests/mysqlserver.py's password user: ALL on database test, mysql_native_password. Every
# client connects with it explicitly over TCP, so authentication goes through the proxy too.
MY_USER=app
MY_PASSWORD=apppass
MY_DB=test
# None of the caller's client variables may send a client elsewhere or add a password.
unset MYSQL_HOST MYSQL_TCP_PORT MYSQL_UNIX_PORT MYSQL_PWD MYSQL_HISTFILE

for t in $TARGETS; do
    case "$t" in
        direct | haproxy | pointsman) ;;
        *) die "unknown target '$t' in TARGETS (use direct, haproxy, pointsman)" ;;
    esac
done
[[ " $TARGETS " == *" pointsman "* ]] && require_pointsman
for w in $WORKLOADS; do
    case "$w" in
        point-select | point-select-prepared) ;;
        *) die "unknown workload '$w' in WORKLOADS (use point-select, point-select-prepared)" ;;
    esac
done
require_python

# The server and its CLI: the script `make test` uses (it only warns when it cannot install;
# tests/mysqlserver.py then says clearly what is missing).
bash "$REPO_ROOT/scripts/ensure-debian-packages.sh" /usr/sbin/mariadbd:mariadb-server \
    /usr/bin/mariadb-install-db:mariadb-server mariadb:mariadb-client mysqlslap:mariadb-client
ensure_tools mariadb:mariadb-client curl:curl
[[ " $TARGETS " == *" haproxy "* ]] && ensure_tools haproxy:haproxy
case "$TOOL" in
    sysbench) ensure_tools sysbench:sysbench ;;
    mysqlslap) ensure_tools mysqlslap:mariadb-client ;;
    auto)
        # Debian's sysbench; when it cannot be installed (not root, no apt-get, no network), mysqlslap.
        if ! command -v sysbench >/dev/null 2>&1 && ((EUID == 0)); then
            (ensure_tools sysbench:sysbench) || true  # a subshell: its die must not end the script
        fi
        TOOL=sysbench
        if ! command -v sysbench >/dev/null 2>&1; then
            log "sysbench unavailable: falling back to mysqlslap"
            TOOL=mysqlslap
            ensure_tools mysqlslap:mariadb-client
        fi
        ;;
    *) die "unknown TOOL '$TOOL' (use sysbench, mysqlslap, auto)" ;;
esac
bench_init

read -r PM_PORT ADMIN_PORT HAP_PORT <<<"$(free_ports 3)"
CLK_TCK="$(getconf CLK_TCK)"
RESULTS="$BENCH_TMP/results.tsv"
: >"$RESULTS"
NOTE="$(load_note)"
log "$NOTE"
log "DURATION=${DURATION}s WARMUP=${WARMUP}s CLIENTS=$CLIENTS TABLE_SIZE=$TABLE_SIZE TOOL=$TOOL WORKLOADS='$WORKLOADS' TARGETS='$TARGETS' tmp=$BENCH_TMP"

# --- the server: tests/mysqlserver.py, on the load core with the load generator -------------
# It prints the port on its first line of output once the users exist, and stops the server
# and deletes its directory on SIGTERM (what stop_pid sends).
log "starting MariaDB"
start_bg mysqlserver "$CORE_LOAD" "$PY" -m tests.mysqlserver --serve \
    --set "innodb-buffer-pool-size=$BUFFER_POOL" --set max-connections=500
SERVER_PID=$LAST_PID
MY_PORT=""
deadline=$((SECONDS + 120))
while [[ -z "$MY_PORT" ]]; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "bench: the MariaDB server did not start; its output:" >&2
        sed 's/^/    /' "$BENCH_TMP/mysqlserver.log" >&2
        exit 2
    fi
    ((SECONDS < deadline)) || die "MariaDB not ready after 120 s (see $BENCH_TMP/mysqlserver.log, KEEP_TMP=1)"
    sleep 0.1
    MY_PORT="$(grep -m1 -E '^[0-9]+$' "$BENCH_TMP/mysqlserver.log" || true)"
done
log "MariaDB on 127.0.0.1:$MY_PORT"

# my_at PORT ARGS...: the mariadb CLI over TCP as the app user to database test, one row a
# line, tab-separated, no column names.
my_at() {
    local port="$1"
    shift
    timeout 30 mariadb --no-defaults --protocol=TCP -h 127.0.0.1 -P "$port" -u "$MY_USER" \
        "--password=$MY_PASSWORD" --connect-timeout=5 --batch --skip-column-names "$MY_DB" "$@"
}

# check_my NAME PORT: the target answers a query on the benchmark's table.
check_my() {
    local name="$1" port="$2" got
    got="$(my_at "$port" -e "SELECT COUNT(*) FROM sbtest1" 2>&1)" || true
    if [[ "$got" != "$TABLE_SIZE" ]]; then
        echo "bench: $name answered '$got' to SELECT COUNT(*) FROM sbtest1 (want '$TABLE_SIZE')" >&2
        return 1
    fi
}

SYSBENCH_CONN=(--db-driver=mysql --mysql-host=127.0.0.1 --mysql-user="$MY_USER" --mysql-password="$MY_PASSWORD"
    --mysql-db="$MY_DB" --tables=1 --table-size="$TABLE_SIZE")

# The table, directly on the server: sysbench's own prepare, or (mysqlslap) the same shape
# filled by one INSERT ... SELECT from a recursive CTE.
log "creating sbtest1 ($TABLE_SIZE rows)"
if [[ "$TOOL" == sysbench ]]; then
    sysbench oltp_point_select "${SYSBENCH_CONN[@]}" --mysql-port="$MY_PORT" prepare >"$BENCH_TMP/prepare.log" 2>&1 || {
        sed 's/^/    /' "$BENCH_TMP/prepare.log" >&2
        die "sysbench prepare failed"
    }
else
    my_at "$MY_PORT" >"$BENCH_TMP/prepare.log" 2>&1 <<EOF || die "could not create sbtest1: $(cat "$BENCH_TMP/prepare.log")"
CREATE TABLE sbtest1 (id INT NOT NULL AUTO_INCREMENT PRIMARY KEY, k INT NOT NULL DEFAULT 0,
    c CHAR(120) NOT NULL DEFAULT '', pad CHAR(60) NOT NULL DEFAULT '', KEY k_1 (k)) ENGINE=InnoDB;
SET SESSION max_recursive_iterations = $TABLE_SIZE + 1;
INSERT INTO sbtest1 (id, k, c, pad)
    WITH RECURSIVE n (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $TABLE_SIZE)
    SELECT i, FLOOR(1 + RAND() * $TABLE_SIZE), SHA2(i, 256), MD5(i) FROM n;
EOF
    # mysqlslap runs a fixed list of statements per client: 1,000 point selects on random ids.
    "$PY" - "$TABLE_SIZE" >"$BENCH_TMP/queries.sql" <<'EOF'
import random, sys
n = int(sys.argv[1])
rng = random.Random(1)
print("".join(f"SELECT c FROM sbtest1 WHERE id={rng.randint(1, n)};\n" for _ in range(1000)), end="")
EOF
fi
my_at "$MY_PORT" -e "ANALYZE TABLE sbtest1" >/dev/null || die "could not analyze sbtest1"

# run_load PORT WORKLOAD SECONDS OUT: one run of the load generator, pinned to the load core.
# sysbench: its own report in OUT. mysqlslap: its report, then a line with the queries run and
# the seconds they took (mysqlslap counts queries, not time: the count comes from QPS_GUESS).
QPS_GUESS=5000
run_load() {
    local port="$1" workload="$2" seconds="$3" out="$4" ps_mode=auto total t0 t1
    if [[ "$TOOL" == sysbench ]]; then
        # point-select: COM_QUERY, the text protocol. point-select-prepared: server-side
        # prepared statements (COM_STMT_PREPARE / COM_STMT_EXECUTE), sysbench's default.
        [[ "$workload" == point-select ]] && ps_mode=disable
        taskset -c "$CORE_LOAD" sysbench oltp_point_select "${SYSBENCH_CONN[@]}" --mysql-port="$port" \
            --db-ps-mode="$ps_mode" --threads="$CLIENTS" --time="$seconds" --report-interval=0 \
            --histogram=off run >"$out" 2>&1
        return
    fi
    # mysqlslap always sends COM_QUERY; "prepared" only differs for sysbench.
    total=$((QPS_GUESS * seconds))
    t0="$(date +%s.%N)"
    taskset -c "$CORE_LOAD" mysqlslap --no-defaults --protocol=TCP -h 127.0.0.1 -P "$port" -u "$MY_USER" \
        "--password=$MY_PASSWORD" --create-schema="$MY_DB" --query="$BENCH_TMP/queries.sql" --delimiter=";" \
        --concurrency="$CLIENTS" --number-of-queries="$total" --iterations=1 >"$out" 2>&1 || return 1
    t1="$(date +%s.%N)"
    echo "mysqlslap-total: queries=$total seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" >>"$out"
}

# measured_qps OUT: queries per second in a run's output (to size mysqlslap's next runs).
measured_qps() {
    awk '/^mysqlslap-total:/ { split($2, q, "="); split($3, s, "="); if (s[2] > 0) printf "%d\n", q[2] / s[2] }' "$1"
}

# measure TARGET PORT PID: per workload, a warm-up run then a measured run.
measure() {
    local target="$1" port="$2" pid="$3" workload out qps
    for workload in $WORKLOADS; do
        out="$BENCH_TMP/$TOOL-$target-$workload.txt"
        log "$target $workload: warm-up ${WARMUP}s, then ${DURATION}s, $CLIENTS clients ($TOOL)"
        if ((WARMUP > 0)); then
            run_load "$port" "$workload" "$WARMUP" "$BENCH_TMP/warmup.txt" ||
                { echo "bench: $TOOL (warm-up) failed against $target:" >&2; sed 's/^/    /' "$BENCH_TMP/warmup.txt" >&2; return 1; }
            if [[ "$TOOL" == mysqlslap ]]; then
                qps="$(measured_qps "$BENCH_TMP/warmup.txt")"
                ((${qps:-0} > 0)) && QPS_GUESS=$qps
            fi
        fi
        measure_begin "$pid"
        run_load "$port" "$workload" "$DURATION" "$out" || {
            echo "bench: $TOOL failed against $target:" >&2
            sed 's/^/    /' "$out" >&2
            return 1
        }
        measure_end "$pid" "$target" "$workload" "$out"
        check_alive "$pid" "${logname:-$target}" || return 1
    done
}

# drop_canary PORT: a DROP through the target (it must fail: the policy refuses it).
drop_canary() {
    my_at "$1" -e "DROP TABLE IF EXISTS pointsman_bench_canary"
}

for target in $TARGETS; do
    case "$target" in
        direct)
            check_my MariaDB "$MY_PORT" || exit 2
            logname=mysqlserver measure direct "$MY_PORT" "$SERVER_PID" || exit 2
            ;;
        haproxy)
            sql_haproxy_target "$MY_PORT" check_my || exit 2
            ;;
        pointsman)
            sql_pointsman_target mysql "$MY_PORT" check_my drop_canary || exit 2
            ;;
    esac
done

stamp="$(date +%Y%m%d-%H%M%S)"
conditions="DURATION=${DURATION}s WARMUP=${WARMUP}s $TOOL, $CLIENTS clients, sbtest1 $TABLE_SIZE rows, innodb-buffer-pool-size $BUFFER_POOL; $NOTE"
status=0
if [[ -s "$RESULTS" ]]; then
    set +e
    # The report: bench/report.py's table layout, noisy-core warning and PASS/FAIL list.
    PYTHONPATH="$REPO_ROOT/bench" "$PY" - "$RESULTS" "$conditions" <<'EOF' | tee "$BENCH_TMP/table.txt"
import re
import sys
from pathlib import Path

from report import Verdicts, noise_warnings, read_results, table

FLOOR = 0.85  # pointsman / direct queries per second, on the text-protocol point selects
FLOOR_WORKLOAD = "point-select"
LABEL = {"point-select": "point select", "point-select-prepared": "point select, prepared"}


def parse(text: str) -> tuple[float, str, str, int]:
    """queries/s, average and 95th-percentile latency, errors."""
    m = re.search(r"^mysqlslap-total: queries=(\d+) seconds=([\d.]+)", text, re.MULTILINE)
    if m:
        queries, seconds = int(m.group(1)), float(m.group(2))
        qps = queries / seconds if seconds > 0 else 0.0
        return qps, "-", "-", 0
    qps = re.search(r"^\s*queries:\s+\d+\s+\(([\d.]+) per sec\.\)", text, re.MULTILINE)
    avg = re.search(r"^\s*avg:\s+([\d.]+)", text, re.MULTILINE)
    p95 = re.search(r"^\s*95th percentile:\s+([\d.]+)", text, re.MULTILINE)
    errors = re.search(r"^\s*ignored errors:\s+(\d+)", text, re.MULTILINE)
    if not (qps and avg and p95):
        raise ValueError(f"no sysbench results in:\n{text}")
    return float(qps.group(1)), f"{avg.group(1)}ms", f"{p95.group(1)}ms", int(errors.group(1)) if errors else 0


runs: dict[tuple[str, str], float] = {}
rows, workloads = [], []
for target, workload, out, cpu, core_p, core_l in read_results(Path(sys.argv[1])):
    qps, avg, p95, errors = parse(Path(out).read_text())
    runs[(target, workload)] = qps
    if workload not in workloads:
        workloads.append(workload)
    cpu_text = cpu if cpu == "-" else f"{cpu}%"
    rows.append([target, LABEL.get(workload, workload), f"{qps:,.0f}", avg, p95, str(errors), cpu_text,
                 f"{core_p}%", f"{core_l}%"])
headers = ["target", "workload", "queries/s", "latency", "p95", "errors", "proxy CPU", "proxy core", "load core"]
print()
print(sys.argv[2])
print()
print(table(headers, rows) + noise_warnings([[r[0], r[1], r[6].rstrip("%"), r[7].rstrip("%")] for r in rows]))
def ratio(a: str, b: str, workload: str) -> str:
    x, y = runs.get((a, workload)), runs.get((b, workload))
    return f"{x / y:.2f}" if x and y else "-"


ratios = [
    [LABEL.get(w, w), ratio("pointsman", "direct", w), ratio("haproxy", "direct", w), ratio("pointsman", "haproxy", w)]
    for w in workloads
]
print()
print(table(["queries/s ratio", "pointsman/direct", "haproxy/direct", "pointsman/haproxy"], ratios))
v = Verdicts()
pm, direct = runs.get(("pointsman", FLOOR_WORKLOAD)), runs.get(("direct", FLOOR_WORKLOAD))
if pm and direct:
    ratio = pm / direct
    v.add(f"{LABEL[FLOOR_WORKLOAD]} queries/s pointsman / direct", f"{ratio:.2f}", f">= {FLOOR}", ratio >= FLOOR)
    print()
    print(table(["check", "value", "target", "verdict"], v.rows))
else:
    print()
    print(f"(no verdict: the floor needs pointsman and direct on the {LABEL[FLOOR_WORKLOAD]} workload)")
sys.exit(1 if v.failed else 0)
EOF
    status=${PIPESTATUS[0]}
    set -e
fi
if ((POINTSMAN_FAILED)); then
    echo "pointsman: not measured, it refused the config (see above)" | tee -a "$BENCH_TMP/table.txt" >&2
    status=2
fi
if mkdir -p "$OUT_DIR/mysql-$stamp" 2>/dev/null; then
    cp "$BENCH_TMP"/table.txt "$BENCH_TMP/$TOOL"-*.txt "$OUT_DIR/mysql-$stamp/" 2>/dev/null || true
    cp "$BENCH_TMP"/pointsman.yaml "$BENCH_TMP"/pointsman-metrics.txt "$BENCH_TMP"/haproxy.cfg "$OUT_DIR/mysql-$stamp/" 2>/dev/null || true
    log "table and raw $TOOL output saved in ${OUT_DIR#"$REPO_ROOT"/}/mysql-$stamp/"
fi
exit "$status"
