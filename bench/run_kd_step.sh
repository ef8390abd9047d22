#!/bin/sh
# bench/run_kd_step.sh - the cost of a KD step against a CE step (bench_kd_step.c).
#   bench/run_kd_step.sh [BUILD_DIR] [threads] [iterations]
set -eu
build=${1:-build}
[ -x "$build/bench/bench_kd_step" ] || { echo "bench_kd_step not built in $build (make bench)"; exit 0; }
"$build/bench/bench_kd_step" "${2:-2}" "${3:-30}"
echo "(load average: $(cut -d' ' -f1-3 /proc/loadavg))"
