#!/usr/bin/env bash
# DNS benchmark: dnsperf against dnsmasq and against pointsman's DNS server (python -m
# discovery.dns), both serving the same 1,000 names, in one run; prints queries/s, latency and
# lost queries, and checks the ratio pointsman/dnsmasq >= 0.8. See bench/README.md.
#
#   bash bench/dns.sh                          # DURATION=10 WARMUP=2 ROUNDS=2 NAMES=1000
#   DURATION=3 ROUNDS=1 bash bench/dns.sh      # a quick look
#
# Environment: DURATION (s per measured run), WARMUP (s of dnsperf before each measured run),
# ROUNDS (measured runs per server, alternating dnsmasq and pointsman), NAMES (services, one
# name each), OUTSTANDING (dnsperf -q: queries in flight), TARGETS (any of dnsmasq pointsman),
# CORE_PROXY / CORE_LOAD (the server's core / dnsperf's core), OUT_DIR (default bench/out),
# KEEP_TMP=1. Exit status: 0 target met, 1 missed, 2 the benchmark could not run.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
ROUNDS="${ROUNDS:-2}"
NAMES="${NAMES:-1000}"
OUTSTANDING="${OUTSTANDING:-100}"
TARGETS="${TARGETS:-dnsmasq pointsman}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/bench/out}"

for t in $TARGETS; do
    case "$t" in
        dnsmasq | pointsman) ;;
        *) die "unknown target '$t' in TARGETS (use dnsmasq, pointsman)" ;;
    esac
done
require_python
ensure_tools dnsperf:dnsperf dnsmasq:dnsmasq-base dig:bind9-dnsutils
bench_init

read -r DM_PORT PM_PORT <<<"$(free_ports 2)"
CLK_TCK="$(getconf CLK_TCK)"
RESULTS="$BENCH_TMP/results.tsv"
: >"$RESULTS"
NOTE="$(load_note | sed 's/proxy on/server on/')"
log "$NOTE"
log "DURATION=${DURATION}s WARMUP=${WARMUP}s ROUNDS=$ROUNDS NAMES=$NAMES OUTSTANDING=$OUTSTANDING TARGETS='$TARGETS' tmp=$BENCH_TMP"

# --- the same names for both: svc<i>.svc.internal A 10.<i/250>.<i%250+1>.1 ------------------
address_of() {
    echo "10.$(($1 / 250)).$(($1 % 250 + 1)).1"
}
{
    for ((i = 0; i < NAMES; i++)); do
        echo "svc$i.svc.internal A"
    done
} >"$BENCH_TMP/queries.txt"

# dnsmasq: static host records, authoritative-looking local answers (local=/internal/ makes
# unknown names NXDOMAIN instead of forwarded), TTL 5 s like pointsman, no upstreams, no log.
{
    echo "port=$DM_PORT"
    echo "listen-address=127.0.0.1"
    echo "bind-interfaces"
    echo "no-resolv"
    echo "no-hosts"
    echo "no-poll"
    echo "local=/internal/"
    echo "local-ttl=5"
    echo "pid-file="
    for ((i = 0; i < NAMES; i++)); do
        echo "host-record=svc$i.svc.internal,$(address_of "$i")"
    done
} >"$BENCH_TMP/dnsmasq.conf"

# pointsman: the discovery section of a config, one static service per name.
{
    echo "discovery:"
    echo "  dns: {listen: 127.0.0.1:$PM_PORT, domain: internal, ttl: 5s, upstreams: []}"
    echo "  services:"
    for ((i = 0; i < NAMES; i++)); do
        echo "    - {name: svc$i, instances: [{id: i$i, address: $(address_of "$i")}]}"
    done
} >"$BENCH_TMP/pointsman.yaml"

# check_answers NAME PORT: a few names answer the right address (over UDP, like dnsperf).
check_answers() {
    local name="$1" port="$2" i got want
    for i in 0 $((NAMES / 2)) $((NAMES - 1)); do
        got="$(dig @127.0.0.1 -p "$port" +short +time=2 +tries=3 "svc$i.svc.internal" A || true)"
        want="$(address_of "$i")"
        if [[ "$got" != "$want" ]]; then
            echo "bench: $name answered '$got' for svc$i.svc.internal (want '$want')" >&2
            return 1
        fi
    done
}

declare -A PIDS PORTS
for target in $TARGETS; do
    case "$target" in
        dnsmasq)
            start_bg dnsmasq "$CORE_PROXY" dnsmasq -k -C "$BENCH_TMP/dnsmasq.conf"
            PORTS[dnsmasq]=$DM_PORT
            ;;
        pointsman)
            start_bg pointsman "$CORE_PROXY" "$PY" -m discovery.dns --config "$BENCH_TMP/pointsman.yaml"
            PORTS[pointsman]=$PM_PORT
            ;;
    esac
    PIDS[$target]=$LAST_PID
    wait_port "${PORTS[$target]}" "$LAST_PID" "$target" 30 || exit 2
    check_answers "$target" "${PORTS[$target]}" || exit 2
done

# irq_stat N: "irq+softirq total" jiffies of CPU N. Loopback UDP is delivered in softirq
# context: time the server's core spends on the packets of the run that /proc/PID/stat does not
# charge to the server process. Counted apart so that the report can tell it from another
# program using the core.
irq_stat() {
    local line
    line="$(grep "^cpu$1 " /proc/stat)"
    # shellcheck disable=SC2086
    set -- $line
    echo "$(($7 + $8)) $(($2 + $3 + $4 + $5 + $6 + $7 + $8 + ${9:-0}))"
}

# run_dnsperf TARGET SECONDS OUT: dnsperf pinned to the load core, one client, OUTSTANDING in flight.
run_dnsperf() {
    taskset -c "$CORE_LOAD" dnsperf -s 127.0.0.1 -p "${PORTS[$1]}" -d "$BENCH_TMP/queries.txt" \
        -l "$2" -c 1 -T 1 -q "$OUTSTANDING" -t 2 >"$3" 2>&1
}

# Both servers stay up; they run one at a time (the idle one only waits in epoll), in
# alternating rounds so that a burst of load from someone else hurts both alike.
for ((round = 1; round <= ROUNDS; round++)); do
    for target in $TARGETS; do
        pid=${PIDS[$target]}
        out="$BENCH_TMP/dnsperf-$target-$round.txt"
        log "$target round $round: warm-up ${WARMUP}s, then ${DURATION}s"
        if ((WARMUP > 0)); then
            run_dnsperf "$target" "$WARMUP" /dev/null || { echo "bench: dnsperf (warm-up) failed against $target" >&2; exit 2; }
        fi
        measure_begin "$pid"
        irq0="$(irq_stat "$CORE_PROXY")"
        run_dnsperf "$target" "$DURATION" "$out" || {
            echo "bench: dnsperf failed against $target:" >&2
            cat "$out" >&2
            exit 2
        }
        irq1="$(irq_stat "$CORE_PROXY")"
        measure_end "$pid" "$target" "round$round" "$out"
        # A seventh column: the server core's irq+softirq time, % (busy_pct of the two samples).
        sed -i "\$ s/\$/\t$(busy_pct "$irq0" "$irq1")/" "$RESULTS"
        check_alive "$pid" "$target" || exit 2
    done
done

stamp="$(date +%Y%m%d-%H%M%S)"
conditions="DURATION=${DURATION}s WARMUP=${WARMUP}s ROUNDS=$ROUNDS, $NAMES names, dnsperf -c1 -T1 -q$OUTSTANDING; $NOTE"
set +e
"$PY" "$REPO_ROOT/bench/dns_report.py" "$RESULTS" --conditions "$conditions" | tee "$BENCH_TMP/table.txt"
status=${PIPESTATUS[0]}
set -e
if mkdir -p "$OUT_DIR/dns-$stamp" 2>/dev/null; then
    cp "$BENCH_TMP"/table.txt "$BENCH_TMP"/dnsperf-*.txt "$BENCH_TMP"/dnsmasq.conf "$BENCH_TMP"/pointsman.yaml \
        "$OUT_DIR/dns-$stamp/" 2>/dev/null || true
    log "table and raw dnsperf output saved in ${OUT_DIR#"$REPO_ROOT"/}/dns-$stamp/"
fi
exit "$status"
