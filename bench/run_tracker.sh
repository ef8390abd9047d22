#!/bin/sh
# Tracker benchmark and its Python peer, in one run.
#   bench/run_tracker.sh [BUILD_DIR] [MAX_LINES]
set -eu
build=${1:-build}
out=$(mktemp /tmp/kdkit-bench-tracker.XXXXXX)
trap 'rm -f "$out"' EXIT
"$build/bench/bench_tracker" "${2:-10000000}" | tee "$out"
/usr/bin/python3 "$(dirname "$0")/tracker_peer.py" 200000 | tee -a "$out"
# update_metrics p50 beside the Python guide-style peer (json.dumps + write)
awk '/^update_metrics \(/ { for (i = 1; i <= NF; i++) if ($i == "p50") k = $(i + 1) }
     /^python guide-style update_metrics/ { for (i = 1; i <= NF; i++) if ($i == "p50") p = $(i + 1) }
     END { if (k > 0 && p > 0)
             printf "target: tracker update_metrics p50 vs Python json.dumps+write | %.1fx faster (kdkit %d ns, Python %d ns) | > 1x | %s\n", p / k, k, p, (p > k ? "met" : "NOT met") }' "$out"
