#!/usr/bin/env bash
# TCP bulk-transfer benchmark: one bulk stream directly, through HAProxy (mode tcp) and
# through pointsman (a `protocol: tcp` listener), in one run, with the ratio pointsman/HAProxy
# checked against the target (at least HAProxy's throughput). See bench/README.md.
#
#   bash bench/tcp.sh                         # DURATION=10 WARMUP=2 TOOL=bulk
#   DURATION=3 TARGETS="direct haproxy" TOOL=iperf3 bash bench/tcp.sh
#
# Environment: DURATION (s per measured run), WARMUP (s of transfer before each measured run),
# DIRECTIONS (up: client->server, down: server->client; default both), TOOL (bulk: our
# splice-based source/sink, bench/bulk.py; iperf3: Debian's iperf3), TARGETS (any of direct
# haproxy pointsman), CORE_PROXY / CORE_LOAD, OUT_DIR (default bench/out), KEEP_TMP=1.
# Exit status: 0 all targets met, 1 a floor was missed, 2 the benchmark could not run.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
DIRECTIONS="${DIRECTIONS:-up down}"
TOOL="${TOOL:-bulk}"
TARGETS="${TARGETS:-direct haproxy pointsman}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/bench/out}"

check_targets
for d in $DIRECTIONS; do
    case "$d" in
        up | down) ;;
        *) die "unknown direction '$d' in DIRECTIONS (use up, down)" ;;
    esac
done
case "$TOOL" in
    bulk | iperf3) ;;
    *) die "unknown TOOL '$TOOL' (use bulk or iperf3)" ;;
esac
require_python
ensure_tools haproxy:haproxy curl:curl
[[ "$TOOL" == iperf3 ]] && ensure_tools iperf3:iperf3
bench_init

read -r UP_PORT HAP_PORT PM_PORT ADMIN_PORT <<<"$(free_ports 4)"
CLK_TCK="$(getconf CLK_TCK)"
RESULTS="$BENCH_TMP/results.tsv"
: >"$RESULTS"
NOTE="$(load_note)"
log "$NOTE"
log "DURATION=${DURATION}s WARMUP=${WARMUP}s DIRECTIONS='$DIRECTIONS' TOOL=$TOOL TARGETS='$TARGETS' tmp=$BENCH_TMP"

# --- the far end, on the load core ------------------------------------------------------------
if [[ "$TOOL" == bulk ]]; then
    start_bg server "$CORE_LOAD" "$PY" "$REPO_ROOT/bench/bulk.py" serve --port "$UP_PORT"
    # A connect-and-close is harmless to bulk.py's server: both proxies health-check it.
    HAP_CHECK="check inter 1s"
    PM_HEALTH="    health: {interval: 1s, timeout: 500ms}"
else
    # iperf3 opens a control connection and then a data connection to the same port; both
    # go through the proxy like any other TCP client's would. No health checks with iperf3:
    # its server reads a cookie from every connection it accepts, and a checker's
    # connect-and-close would be one more client for it to turn away.
    start_bg server "$CORE_LOAD" iperf3 --server --bind 127.0.0.1 --port "$UP_PORT" --rcv-timeout 10000
    HAP_CHECK=""
    PM_HEALTH=""
fi
SERVER_PID=$LAST_PID
wait_port "$UP_PORT" "$SERVER_PID" server || exit 2
sleep 0.2  # our probe connection is one the server has to shrug off; let it

write_haproxy_config() {
    cat >"$BENCH_TMP/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend bulk
    bind 127.0.0.1:$HAP_PORT
    default_backend sink
backend sink
    server sink 127.0.0.1:$UP_PORT $HAP_CHECK
EOF
}

write_pointsman_config() {
    cat >"$BENCH_TMP/pointsman.yaml" <<EOF
admin: {listen: 127.0.0.1:$ADMIN_PORT}
clusters:
  sink:
    endpoints: [127.0.0.1:$UP_PORT]
$PM_HEALTH
listeners:
  - {name: bulk, listen: 127.0.0.1:$PM_PORT, protocol: tcp, to: sink}
EOF
}

# transfer PORT SECONDS DIRECTION OUT: one client run (JSON to OUT), pinned to the load core,
# bounded by `timeout` in case a proxy stalls the transfer.
transfer() {
    local port="$1" seconds="$2" direction="$3" out="$4" reverse=()
    if [[ "$TOOL" == bulk ]]; then
        timeout $((seconds + 20)) taskset -c "$CORE_LOAD" "$PY" "$REPO_ROOT/bench/bulk.py" run \
            --port "$port" --seconds "$seconds" --direction "$direction" >"$out" 2>&1
    else
        [[ "$direction" == down ]] && reverse=(--reverse)
        timeout $((seconds + 20)) taskset -c "$CORE_LOAD" iperf3 --client 127.0.0.1 --port "$port" \
            --time "$seconds" --connect-timeout 5000 --json "${reverse[@]}" >"$out" 2>&1
    fi
}

# measure TARGET PORT PID LOGNAME
measure() {
    local target="$1" port="$2" pid="$3" logname="$4" direction out
    for direction in $DIRECTIONS; do
        out="$BENCH_TMP/$TOOL-$target-$direction.json"
        log "$target $direction: warm-up ${WARMUP}s, then ${DURATION}s"
        if ((WARMUP > 0)); then
            transfer "$port" "$WARMUP" "$direction" "$BENCH_TMP/warmup.json" || {
                echo "bench: $TOOL (warm-up) failed through $target:" >&2
                cat "$BENCH_TMP/warmup.json" >&2
                check_alive "$pid" "$logname" || true
                return 1
            }
        fi
        measure_begin "$pid"
        transfer "$port" "$DURATION" "$direction" "$out" || {
            echo "bench: $TOOL failed through $target:" >&2
            cat "$out" >&2
            check_alive "$pid" "$logname" || true
            return 1
        }
        measure_end "$pid" "$target" "$direction" "$out"
        check_alive "$pid" "$logname" || return 1
    done
}

for target in $TARGETS; do
    case "$target" in
        direct)
            measure direct "$UP_PORT" "$SERVER_PID" server || exit 2
            ;;
        haproxy)
            write_haproxy_config
            haproxy -c -q -f "$BENCH_TMP/haproxy.cfg" || die "HAProxy refused its config"
            start_bg haproxy "$CORE_PROXY" haproxy -db -f "$BENCH_TMP/haproxy.cfg"
            pid=$LAST_PID
            wait_port "$HAP_PORT" "$pid" haproxy || exit 2
            measure haproxy "$HAP_PORT" "$pid" haproxy || exit 2
            stop_bg "$pid"
            ;;
        pointsman)
            write_pointsman_config
            start_bg pointsman "$CORE_PROXY" "$POINTSMAN" router --config "$BENCH_TMP/pointsman.yaml"
            pid=$LAST_PID
            wait_port "$PM_PORT" "$pid" pointsman 30 || exit 2
            measure pointsman "$PM_PORT" "$pid" pointsman || exit 2
            if curl -s -m 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$BENCH_TMP/pointsman-metrics.txt" 2>/dev/null; then
                grep -E '^pointsman_tcp_(bytes|connections)_total' "$BENCH_TMP/pointsman-metrics.txt" |
                    sed 's/^/    /' >"$BENCH_TMP/pointsman-metrics-summary.txt" || true
            fi
            stop_bg "$pid"
            ;;
    esac
done

stamp="$(date +%Y%m%d-%H%M%S)"
if [[ "$TOOL" == bulk ]]; then
    conditions="DURATION=${DURATION}s WARMUP=${WARMUP}s bench/bulk.py: 1 connection, 1 MiB writes, splice sink; $NOTE"
else
    conditions="DURATION=${DURATION}s WARMUP=${WARMUP}s iperf3: 1 stream, 128 KiB writes; $NOTE"
fi
set +e
"$PY" "$REPO_ROOT/bench/report.py" tcp "$RESULTS" --conditions "$conditions" | tee "$BENCH_TMP/table.txt"
status=${PIPESTATUS[0]}
set -e
if [[ -s "$BENCH_TMP/pointsman-metrics-summary.txt" ]]; then
    {
        echo
        echo "pointsman /metrics after the run (selected lines):"
        cat "$BENCH_TMP/pointsman-metrics-summary.txt"
    } | tee -a "$BENCH_TMP/table.txt"
fi
if mkdir -p "$OUT_DIR/tcp-$stamp" 2>/dev/null; then
    cp "$BENCH_TMP"/table.txt "$BENCH_TMP"/"$TOOL"-*.json "$OUT_DIR/tcp-$stamp/" 2>/dev/null || true
    cp "$BENCH_TMP"/haproxy.cfg "$BENCH_TMP"/pointsman.yaml "$OUT_DIR/tcp-$stamp/" 2>/dev/null || true
    log "table and raw $TOOL output saved in ${OUT_DIR#"$REPO_ROOT"/}/tcp-$stamp/"
fi
exit "$status"
