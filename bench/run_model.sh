#!/bin/sh
# bench/run_model.sh - training tokens/s and peak RSS of the C model beside
# the same model in PyTorch, in one run.  Builds a Release tree in BUILD_DIR.
# Not a test.
#   usage: bench/run_model.sh [BUILD_DIR=build] [threads=2] [steps=20]
set -eu
cd "$(dirname "$0")/.."
BUILD=${1:-build}
THREADS=${2:-2}
STEPS=${3:-20}
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DKD_BUILD_TESTS=OFF >/dev/null
cmake --build "$BUILD" -j2 --target bench_model >/dev/null
echo "model: 4 layers, 4 heads, width 128, context 128, batch 16, $THREADS threads, $STEPS timed steps"
OUT=$(mktemp /tmp/kdkit-bench-model.XXXXXX)
trap 'rm -f "$OUT"' EXIT
OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} OPENBLAS_NUM_THREADS=$THREADS "$BUILD/bench/bench_model" "$THREADS" "$STEPS" | tee "$OUT"
/usr/bin/python3 bench/model_peer.py "$THREADS" "$STEPS" | tee -a "$OUT"
awk '/tokens\/s/ { for (i = 1; i <= NF; i++) if ($i == "tokens/s") { if ($1 == "PyTorch") p = $(i - 1); else if ($1 == "kdkit") k = $(i - 1) } }
  END { if (k > 0 && p > 0) printf "target: model step tokens/s vs PyTorch (bench_model) | %.2fx (%.0f vs %.0f) | > 1x | %s\n", k / p, k, p, (k > p ? "met" : "NOT met") }' "$OUT"
