#!/bin/sh
# The Python binding's update_metrics beside the guide-style Python tracker.
#   bench/run_python.sh [BUILD_DIR] [CALLS]
set -eu
build=${1:-build}
KDKIT_LIBRARY="$(cd "$build" && pwd)/libkdkit.so" \
  /usr/bin/python3 -B "$(dirname "$0")/python_tracker.py" "${2:-200000}"
