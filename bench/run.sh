#!/bin/sh
# Run every benchmark (bench/run_*.sh) against a Release build.
#   bench/run.sh [BUILD_DIR]
set -eu
build=${1:-build}
here=$(dirname "$0")
for s in "$here"/run_*.sh; do
  echo "== $(basename "$s")"
  sh "$s" "$build"
done
