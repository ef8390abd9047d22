#!/bin/sh
# bench/run_teacher.sh - the teacher benchmarks beside their Python peers, in
# one run, with the ratios.  Use an optimised build (not the sanitizer one):
#
#   cmake -S . -B build-rel -DCMAKE_BUILD_TYPE=Release && make -C build-rel -j2 kdkit_cli bench_teacher
#   bench/run_teacher.sh build-rel [N_INSERT N_LOOKUP N_REQUESTS IN_FLIGHT]
set -eu
BUILD=${1:-build}
NINS=${2:-2000}
NLOOK=${3:-200000}
NREQ=${4:-5000}
INFL=${5:-64}
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH="$BUILD/bench/bench_teacher"
KDKIT="$BUILD/kdkit"
PY=/usr/bin/python3
WORK=$(mktemp -d /tmp/kd_bench_teacher.XXXXXX)
SERVE_PID=
cleanup() {
    if [ -n "$SERVE_PID" ]; then kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

echo "# teacher cache: $NINS durable inserts, $NLOOK hit lookups"
"$BENCH" cache "$WORK" "$NINS" "$NLOOK" | tee "$WORK/c.txt"
"$PY" "$HERE/teacher_peer.py" cache "$WORK" "$NINS" "$NLOOK" | tee "$WORK/p.txt"

"$KDKIT" serve --toy --port 0 --port-file "$WORK/port" >/dev/null 2>&1 &
SERVE_PID=$!
for _ in $(seq 50); do [ -s "$WORK/port" ] && break; sleep 0.1; done
PORT=$(cat "$WORK/port")
echo "# client: $NREQ requests, $INFL in flight, max_tokens 1, against kdkit serve --toy on port $PORT"
"$BENCH" client "$PORT" "$NREQ" "$INFL" raw "$WORK" | tee -a "$WORK/c.txt"
"$PY" "$HERE/teacher_peer.py" client "$PORT" "$NREQ" "$INFL" | tee -a "$WORK/p.txt"
"$BENCH" client "$PORT" "$NREQ" "$INFL" full "$WORK" | tee -a "$WORK/c.txt"

v() { awk -v k="$1" '$1 == k { print $2 }' "$WORK/c.txt" "$WORK/p.txt"; }
echo "# ratios (kdkit / Python)"
awk -v a="$(v kdkit_cache_durable_inserts_per_s)" -v b="$(v diskcache_durable_inserts_per_s)" \
    'BEGIN { printf "durable inserts/s: %.2fx\n", a / b }'
awk -v a="$(v kdkit_cache_hit_p50_us)" -v b="$(v diskcache_hit_p50_us)" \
    'BEGIN { printf "hit latency p50: %.2fx faster (kdkit %.2f us, target <= 10 us)\n", b / a, a }'
awk -v a="$(v kdkit_cache_hits_per_s)" -v b="$(v diskcache_hits_per_s)" \
    'BEGIN { printf "hit lookups/s: %.2fx\n", a / b }'
awk -v a="$(v kdkit_client_raw_requests_per_s)" -v b="$(v aiohttp_client_requests_per_s)" \
    'BEGIN { printf "client requests/s: %.2fx (target >= 5x)\n", a / b }'
awk -v a="$(v kdkit_client_full_requests_per_s)" -v b="$(v aiohttp_client_requests_per_s)" \
    'BEGIN { printf "client requests/s, full path with durable ledger: %.2fx\n", a / b }'
# for bench/run.sh's closing table
awk -v a="$(v kdkit_cache_hit_p50_us)" \
    'BEGIN { printf "target: teacher cache hit latency p50 | %.2f us | <= 10 us | %s\n", a, (a <= 10 ? "met" : "NOT met") }'
awk -v a="$(v kdkit_client_raw_requests_per_s)" -v b="$(v aiohttp_client_requests_per_s)" \
    'BEGIN { r = b > 0 ? a / b : 0; printf "target: teacher client requests/s vs aiohttp | %.2fx (%.0f vs %.0f /s) | >= 5x | %s\n", r, a, b, (r >= 5 ? "met" : "NOT met") }'
