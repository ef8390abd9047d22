#!/bin/sh
# tests/install_test.sh - what a C user of libkdkit does: install the build
# into a scratch prefix, then compile and run a small tracker program found
# only through pkg-config (shared library), and again against the static one.
#   install_test.sh BUILD_DIR SOURCE_DIR CC "EXTRA_FLAGS"
set -eu
build=$1 src=$2 cc=$3 extra=$4
tmp=$(mktemp -d /tmp/kdkit-install-test-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
PKG_CONFIG_PATH="$tmp/prefix/lib/pkgconfig:$tmp/prefix/lib64/pkgconfig"
export PKG_CONFIG_PATH
pkg-config --exists kdkit || { echo "FAIL: pkg-config cannot find kdkit in $tmp/prefix"; exit 1; }
deps="jansson yaml-0.1 libcrypto libcurl sqlite3 libmicrohttpd openblas libxxhash"
# shellcheck disable=SC2086
$cc $extra "$src/tests/install_use.c" -o "$tmp/use" $(pkg-config --cflags --libs kdkit) \
    $(pkg-config --libs $deps) -lm -lpthread
libdir=$(pkg-config --variable=libdir kdkit)
LD_LIBRARY_PATH="$libdir" "$tmp/use" "$tmp/run-shared"
# shellcheck disable=SC2086
$cc $extra "$src/tests/install_use.c" -o "$tmp/use-static" $(pkg-config --cflags kdkit) \
    "$libdir/libkdkit.a" $(pkg-config --libs $deps) -lm -lpthread
"$tmp/use-static" "$tmp/run-static"
echo "1 passed, 0 failed: installed headers, libraries and kdkit.pc work"
