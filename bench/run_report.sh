#!/bin/sh
# bench/run_report.sh - how long `kdkit report` takes on a long run and how
# big the page gets, beside a peer: the same streaming min/max-per-bucket
# downsampling of metrics.jsonl in Python (json.loads per line), the way one
# would script it.  Not a test (tests/report_e2e.sh bounds the page size).
#
# The run: a real 60-step `kdkit train` (configs/tiny-test.yaml) whose
# metrics.jsonl is then extended to LINES lines of the tracker's own format.
# kdkit reads all of them; the peer reads the first PEER_LINES (it is slow)
# and the ratio compares lines per second.
#
#   usage: bench/run_report.sh [BUILD_DIR=build] [LINES=10000000] [PEER_LINES=1000000]
set -eu
cd "$(dirname "$0")/.."
BUILD=${1:-build}
LINES=${2:-10000000}
PEER=${3:-1000000}
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j2 --target kdkit_cli >/dev/null
OUT=$(mktemp -d /tmp/kdkit-bench-report-XXXXXX)
trap 'rm -rf "$OUT"' EXIT
"$BUILD/kdkit" train --config configs/tiny-test.yaml --output-dir "$OUT/run" >"$OUT/train.log" 2>&1
awk -v n="$LINES" 'BEGIN {
  for (i = 61; i <= n; i++) {
    l = 2 + sin(i / 50000.0) + (i % 7919 == 0 ? 3 : 0)
    printf "{\"step\":%d,\"timestamp\":%.6f,\"loss\":%.17g,\"loss_components\":{\"kd\":null,\"ce\":%.17g,\"intermediate\":null},\"learning_rate\":0.00030000000000000003,\"samples_processed\":%d,\"tokens_processed\":%d,\"throughput_samples_per_sec\":512.29999999999995,\"throughput_tokens_per_sec\":65574.399999999994}\n", i, 1.8e9 + i * 0.01, l, l, i * 4, i * 128
  }
}' >>"$OUT/run/metrics.jsonl"
BYTES=$(wc -c <"$OUT/run/metrics.jsonl")
cat "$OUT/run/metrics.jsonl" >/dev/null # warm the page cache for both
echo "kdkit report: metrics.jsonl of $(wc -l <"$OUT/run/metrics.jsonl") lines, $(awk -v b="$BYTES" 'BEGIN{printf "%.0f", b/1048576}') MiB; $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg)"
/usr/bin/time -v -o "$OUT/time.txt" "$BUILD/kdkit" report "$OUT/run" -o "$OUT/report.html" --quiet
S=$(awk -F': ' '/Elapsed \(wall clock\)/ {n = split($2, a, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + a[i]; print s}' "$OUT/time.txt")
RSS=$(awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2 / 1024}' "$OUT/time.txt")
SIZE=$(wc -c <"$OUT/report.html")
head -n "$PEER" "$OUT/run/metrics.jsonl" >"$OUT/peer.jsonl"
/usr/bin/python3 - "$OUT/peer.jsonl" "$PEER" "$LINES" "$S" "$SIZE" "$RSS" <<'PY'
import json, sys, time
path, peer, lines, s, size, rss = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
t0 = time.monotonic()
nb, width, b, n = 1000, 1, [], 0
with open(path, "rb") as f:
    for line in f:
        o = json.loads(line)
        x, y = o["step"], o["loss"]
        i = n // width
        while i >= nb:
            b = [[min(b[k][0], b[k+1][0]) if k + 1 < len(b) else b[k][0],
                  max(b[k][1], b[k+1][1]) if k + 1 < len(b) else b[k][1]] for k in range(0, len(b), 2)]
            width *= 2
            i = n // width
        if i == len(b):
            b.append([y, y])
        else:
            b[i][0] = min(b[i][0], y); b[i][1] = max(b[i][1], y)
        n += 1
pt = time.monotonic() - t0
kd_rate, py_rate = lines / s, peer / pt
print("  kdkit report  %10d lines  %6.2f s  %9.0f lines/s  page %.2f MB  peak RSS %s MiB" % (lines, s, kd_rate, size / 1e6, rss))
print("  Python peer   %10d lines  %6.2f s  %9.0f lines/s  (loss only, one series)" % (peer, pt, py_rate))
print("  ratio         %.1fx the peer's lines/s" % (kd_rate / py_rate))
PY
