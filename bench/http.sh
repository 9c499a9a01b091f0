#!/usr/bin/env bash
# HTTP benchmark: wrk against nginx directly, through HAProxy, and through pointsman, in one
# run, with the ratio pointsman/HAProxy checked against the targets. See bench/README.md.
#
#   bash bench/http.sh                       # DURATION=10 WARMUP=3 CONNS=50
#   DURATION=3 TARGETS="direct haproxy" bash bench/http.sh
#
# Environment: DURATION (s per measured run), WARMUP (s of wrk before each measured run),
# CONNS (wrk connections, small responses), CONNS_LARGE (wrk connections, 1 MiB responses),
# TARGETS (any of direct haproxy pointsman), CORE_PROXY / CORE_LOAD (CPU numbers),
# OUT_DIR (where the table and raw wrk output are saved; default bench/out), KEEP_TMP=1.
# Exit status: 0 all targets met, 1 a floor was missed, 2 the benchmark could not run.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-3}"
CONNS="${CONNS:-50}"
CONNS_LARGE="${CONNS_LARGE:-$CONNS}"
TARGETS="${TARGETS:-direct haproxy pointsman}"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/bench/out}"

check_targets
require_python
ensure_tools haproxy:haproxy wrk:wrk nginx:nginx-light curl:curl
bench_init

read -r UP_PORT HAP_PORT PM_PORT ADMIN_PORT <<<"$(free_ports 4)"
CLK_TCK="$(getconf CLK_TCK)"
RESULTS="$BENCH_TMP/results.tsv"
: >"$RESULTS"
NOTE="$(load_note)"
log "$NOTE"
log "DURATION=${DURATION}s WARMUP=${WARMUP}s CONNS=$CONNS CONNS_LARGE=$CONNS_LARGE TARGETS='$TARGETS' tmp=$BENCH_TMP"

# --- upstream: nginx, one worker, pinned to the load core -------------------------------------
mkdir -p "$BENCH_TMP/nginx/www" "$BENCH_TMP/nginx/tmp"
head -c 1048576 /dev/zero | tr '\0' 'x' >"$BENCH_TMP/nginx/www/1m"
cat >"$BENCH_TMP/nginx/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $BENCH_TMP/nginx/nginx.pid;
error_log $BENCH_TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    client_body_temp_path $BENCH_TMP/nginx/tmp/body;
    proxy_temp_path $BENCH_TMP/nginx/tmp/proxy;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$UP_PORT backlog=4096;
        location = / { default_type text/plain; return 200 "Hello, world!"; }
        location = /healthz { default_type text/plain; return 200 "ok"; }
        location = /1m { root $BENCH_TMP/nginx/www; }
    }
}
EOF
start_bg nginx "$CORE_LOAD" nginx -p "$BENCH_TMP/nginx" -e "$BENCH_TMP/nginx/error.log" -c "$BENCH_TMP/nginx/nginx.conf"
NGINX_PID=$LAST_PID
wait_port "$UP_PORT" "$NGINX_PID" nginx || exit 2

# --- proxies --------------------------------------------------------------------------------
# HAProxy doing the same work as pointsman: path routing, an HTTP health check every second,
# X-Forwarded-For, keep-alive both sides, one thread, no logging.
write_haproxy_config() {
    cat >"$BENCH_TMP/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    option forwardfor
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend bench
    bind 127.0.0.1:$HAP_PORT
    acl api path_beg /api
    use_backend web if api
    default_backend web
backend web
    balance roundrobin
    option httpchk GET /healthz
    server nginx 127.0.0.1:$UP_PORT check inter 1s
EOF
}

# pointsman with all features on: path_prefix routing, an HTTP health check on the cluster,
# outlier detection, X-Forwarded-* (on by default), metrics on the admin port.
write_pointsman_config() {
    cat >"$BENCH_TMP/pointsman.yaml" <<EOF
admin: {listen: 127.0.0.1:$ADMIN_PORT}
clusters:
  web:
    endpoints: [127.0.0.1:$UP_PORT]
    balancer: round_robin
    health: {http: /healthz, interval: 1s, timeout: 500ms}
    outlier: {consecutive_failures: 5}
listeners:
  - name: bench
    listen: 127.0.0.1:$PM_PORT
    protocol: http
    routes:
      - name: api
        match: {path_prefix: /api}
        to: web
      - name: default
        match: {path_prefix: /}
        to: web
EOF
}

# check_responses NAME PORT: a 200 with the right body size on / and /1m, within 20 s (a
# proxy may hold traffic until its first health checks pass).
check_responses() {
    local name="$1" port="$2" got deadline=$((SECONDS + 20))
    while :; do
        got="$(curl -s -o /dev/null -m 2 -w '%{http_code} %{size_download}' "http://127.0.0.1:$port/" || true)"
        [[ "$got" == "200 13" ]] && break
        if ((SECONDS >= deadline)); then
            echo "bench: $name answered '$got' for / (want '200 13')" >&2
            return 1
        fi
        sleep 0.2
    done
    got="$(curl -s -o /dev/null -m 5 -w '%{http_code} %{size_download}' "http://127.0.0.1:$port/1m" || true)"
    if [[ "$got" != "200 1048576" ]]; then
        echo "bench: $name answered '$got' for /1m (want '200 1048576')" >&2
        return 1
    fi
}

# measure TARGET PORT PID: warm-up then measured wrk runs for the small and the 1 MiB response.
measure() {
    local target="$1" port="$2" pid="$3" case path conns out
    for case in small large; do
        if [[ "$case" == small ]]; then
            path=/
            conns=$CONNS
        else
            path=/1m
            conns=$CONNS_LARGE
        fi
        out="$BENCH_TMP/wrk-$target-$case.txt"
        log "$target $path: warm-up ${WARMUP}s, then ${DURATION}s, $conns connections"
        if ((WARMUP > 0)); then
            taskset -c "$CORE_LOAD" wrk -t1 -c"$conns" -d"${WARMUP}s" "http://127.0.0.1:$port$path" >/dev/null ||
                { echo "bench: wrk (warm-up) failed against $target" >&2; return 1; }
        fi
        measure_begin "$pid"
        taskset -c "$CORE_LOAD" wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 5s --latency \
            "http://127.0.0.1:$port$path" >"$out" || {
            echo "bench: wrk failed against $target:" >&2
            cat "$out" >&2
            return 1
        }
        measure_end "$pid" "$target" "$case" "$out"
        check_alive "$pid" "${logname:-$target}" || return 1
    done
}

for target in $TARGETS; do
    case "$target" in
        direct)
            check_responses nginx "$UP_PORT" || exit 2
            logname=nginx measure direct "$UP_PORT" "$NGINX_PID" || exit 2
            ;;
        haproxy)
            write_haproxy_config
            haproxy -c -q -f "$BENCH_TMP/haproxy.cfg" || die "HAProxy refused its config"
            start_bg haproxy "$CORE_PROXY" haproxy -db -f "$BENCH_TMP/haproxy.cfg"
            pid=$LAST_PID
            wait_port "$HAP_PORT" "$pid" haproxy || exit 2
            check_responses haproxy "$HAP_PORT" || exit 2
            measure haproxy "$HAP_PORT" "$pid" || exit 2
            stop_bg "$pid"
            ;;
        pointsman)
            write_pointsman_config
            start_bg pointsman "$CORE_PROXY" "$POINTSMAN" router --config "$BENCH_TMP/pointsman.yaml"
            pid=$LAST_PID
            wait_port "$PM_PORT" "$pid" pointsman 30 || exit 2
            check_responses pointsman "$PM_PORT" || {
                sed 's/^/    /' "$BENCH_TMP/pointsman.log" >&2
                exit 2
            }
            measure pointsman "$PM_PORT" "$pid" || exit 2
            # Show that the features were really on: requests counted, endpoint healthy.
            if curl -s -m 5 "http://127.0.0.1:$ADMIN_PORT/metrics" >"$BENCH_TMP/pointsman-metrics.txt"; then
                grep -E '^pointsman_(http_requests_total|upstream_endpoint_healthy|upstream_connections_total)' \
                    "$BENCH_TMP/pointsman-metrics.txt" | sed 's/^/    /' >"$BENCH_TMP/pointsman-metrics-summary.txt" || true
            else
                echo "    (no answer from the admin port's /metrics)" >"$BENCH_TMP/pointsman-metrics-summary.txt"
            fi
            stop_bg "$pid"
            ;;
    esac
done

stamp="$(date +%Y%m%d-%H%M%S)"
conditions="DURATION=${DURATION}s WARMUP=${WARMUP}s wrk -t1 -c$CONNS (1 MiB: -c$CONNS_LARGE); $NOTE"
set +e
"$PY" "$REPO_ROOT/bench/report.py" http "$RESULTS" --conditions "$conditions" | tee "$BENCH_TMP/table.txt"
status=${PIPESTATUS[0]}
set -e
if [[ -s "$BENCH_TMP/pointsman-metrics-summary.txt" ]]; then
    {
        echo
        echo "pointsman /metrics after the run (selected lines):"
        cat "$BENCH_TMP/pointsman-metrics-summary.txt"
    } | tee -a "$BENCH_TMP/table.txt"
fi
if mkdir -p "$OUT_DIR/http-$stamp" 2>/dev/null; then
    cp "$BENCH_TMP"/table.txt "$BENCH_TMP"/wrk-*.txt "$OUT_DIR/http-$stamp/" 2>/dev/null || true
    cp "$BENCH_TMP"/haproxy.cfg "$BENCH_TMP"/pointsman.yaml "$BENCH_TMP"/nginx/nginx.conf "$OUT_DIR/http-$stamp/" 2>/dev/null || true
    log "table and raw wrk output saved in ${OUT_DIR#"$REPO_ROOT"/}/http-$stamp/"
fi
exit "$status"
