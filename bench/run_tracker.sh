#!/bin/sh
# Tracker benchmark and its Python peer, in one run.
#   bench/run_tracker.sh [BUILD_DIR] [MAX_LINES]
set -eu
build=${1:-build}
"$build/bench/bench_tracker" "${2:-10000000}"
/usr/bin/python3 "$(dirname "$0")/tracker_peer.py" 200000
