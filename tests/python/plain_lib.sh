#!/bin/sh
# tests/python/plain_lib.sh SRC DIR - bring the non-sanitized shared libkdkit
# in DIR up to date (configuring DIR the way `make release-check` does when
# it does not exist yet), for the Python tests of a sanitized build.
set -eu
src=$1
dir=$2
if [ ! -f "$dir/CMakeCache.txt" ]; then
  cmake -S "$src" -B "$dir" -DCMAKE_C_COMPILER=gcc -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build "$dir" --target kdkit -j2 >/dev/null
test -f "$dir/libkdkit.so"
echo "python tests use $dir/libkdkit.so"
