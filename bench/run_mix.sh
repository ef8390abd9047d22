#!/bin/sh
# bench/run_mix.sh - `kdkit mix` samples/s beside a Python asyncio+aiohttp
# generator doing the same work in the same run (one fsync'd JSONL row per
# sample), and restart time / peak memory at 10^6 completed samples.  Use an
# optimised build (not the sanitizer one):
#
#   cmake -S . -B build-rel -DCMAKE_BUILD_TYPE=Release && make -C build-rel -j2 kdkit_cli bench_mix
#   bench/run_mix.sh build-rel [N_SAMPLES IN_FLIGHT N_BIG TAIL MAX_TOKENS]
#
# The Python peer needs python3-aiohttp (scripts/install-deps.sh --bench).
set -eu
BUILD=${1:-build}
N=${2:-20000}
INFL=${3:-64}
BIG=${4:-1000000}
TAIL=${5:-10000}
MAXT=${6:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH="$BUILD/bench/bench_mix"
KDKIT=$(cd "$(dirname "$BUILD/kdkit")" && pwd)/kdkit
PY=/usr/bin/python3
WORK=$(mktemp -d /tmp/kd_bench_mix.XXXXXX)
SERVE_PID=
cleanup() {
    if [ -n "$SERVE_PID" ]; then kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

"$KDKIT" serve --toy --port 0 --port-file "$WORK/port" >/dev/null 2>&1 &
SERVE_PID=$!
for _ in $(seq 50); do [ -s "$WORK/port" ] && break; sleep 0.1; done
PORT=$(cat "$WORK/port")
cat > "$WORK/cfg.yaml" <<CFG
teacher:
  base_url: http://127.0.0.1:$PORT/v1
  model: kdkit-toy
  endpoint: chat
  max_in_flight: $INFL
  prices: {input_per_million: 0.15, output_per_million: 0.60}
mix:
  max_tokens: $MAXT
  top_logprobs: 5
CFG
"$BENCH" prompts "$WORK/p.jsonl" "$N"
echo "# $N samples, $INFL in flight, max_tokens $MAXT, top_logprobs 5, kdkit serve --toy on port $PORT"
"$BENCH" run "$KDKIT" mix --config "$WORK/cfg.yaml" --prompts "$WORK/p.jsonl" --output-dir "$WORK/mix" > "$WORK/k.txt"
kwall=$(awk '$1 == "wall_s" { print $2 }' "$WORK/k.txt")
krate=$(awk -v n="$N" -v w="$kwall" 'BEGIN { printf "%.0f", n / w }')
echo "kdkit_mix_samples_per_s $krate"
"$PY" "$HERE/mix_peer.py" "$PORT" "$WORK/p.jsonl" "$WORK/peer1.jsonl" "$INFL" "$MAXT" 5 1 | tee "$WORK/p1.txt"
"$PY" "$HERE/mix_peer.py" "$PORT" "$WORK/p.jsonl" "$WORK/peer64.jsonl" "$INFL" "$MAXT" 5 "$INFL" | tee "$WORK/p64.txt"
p1=$(awk '{ print $2 }' "$WORK/p1.txt")
p64=$(awk '{ print $2 }' "$WORK/p64.txt")
awk -v k="$krate" -v a="$p1" -v b="$p64" 'BEGIN {
  printf "ratio_vs_python_fsync_each_row %.2fx (target >= 5x)\n", k / a
  printf "ratio_vs_python_fsync_per_%s_rows %.2fx\n", '"$INFL"', k / b
  printf "target: kdkit mix samples/s vs aiohttp, fsync per row | %.2fx (%d vs %d /s) | >= 5x | %s\n", \
    k / a, k, a, (k / a >= 5 ? "met" : "NOT met") }'
rm -rf "$WORK/mix"

echo "# restart at $BIG completed samples ($TAIL rows written after the last progress save)"
"$BENCH" prompts "$WORK/big.jsonl" "$BIG"
"$KDKIT" mix --config "$WORK/cfg.yaml" --prompts "$WORK/big.jsonl" --output-dir "$WORK/big" --limit 1 >/dev/null 2>&1 || true
"$BENCH" fill "$WORK/big" "$BIG" "$TAIL" "$WORK/big.jsonl"
echo "mix_jsonl_bytes $(stat -c %s "$WORK/big/mix.jsonl")"
"$BENCH" run "$KDKIT" mix --config "$WORK/cfg.yaml" --prompts "$WORK/big.jsonl" --output-dir "$WORK/big" | sed 's/^/restart_tail_/'
"$BENCH" run "$KDKIT" mix --config "$WORK/cfg.yaml" --prompts "$WORK/big.jsonl" --output-dir "$WORK/big" | sed 's/^/restart_clean_/'
