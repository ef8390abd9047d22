#!/bin/sh
# tests/install_test.sh - what a C user of libkdkit does, three ways:
#   1. `cmake --install BUILD --prefix P`: a small tracker program compiled
#      through pkg-config (shared library found by an rpath, as README says;
#      and the static one), and through find_package(kdkit) in a CMake project
#      (kdkit::kdkit and kdkit::kdkit_static);
#   2. a staged install, `DESTDIR=S cmake --install BUILD --prefix /usr`, used
#      from S/usr through pkg-config;
#   3. a multiarch libdir: a configure-only build with CMAKE_INSTALL_PREFIX=/usr
#      and CMAKE_INSTALL_LIBDIR=lib/x86_64-linux-gnu installs its kdkit_devel
#      component (kdkit.pc, the CMake package) under DESTDIR; with the headers
#      and libraries placed where that configuration installs them, both
#      pkg-config and find_package must point at them (kdkit.pc used to say
#      <prefix>/lib/include);
#   4. a configure without cmocka builds the library with tests off, and
#      -DKD_BUILD_TESTS=ON without cmocka is an error naming it.
#   install_test.sh BUILD_DIR SOURCE_DIR CC "EXTRA_FLAGS"
set -eu
build=$1 src=$2 cc=$3 extra=$4
tmp=$(mktemp -d /tmp/kdkit-install-test-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
deps="jansson yaml-0.1 libcrypto libcurl sqlite3 libmicrohttpd openblas libxxhash"
pass=0

# pkg-config build of install_use.c against the kdkit.pc found in $1
# (PKG_CONFIG_PATH), shared with an rpath, then static; both run.
use_pkgconfig() {
  PKG_CONFIG_PATH=$1
  export PKG_CONFIG_PATH
  pkg-config --exists kdkit || { echo "FAIL: pkg-config cannot find kdkit in $1"; exit 1; }
  inc=$(pkg-config --variable=includedir kdkit)
  libdir=$(pkg-config --variable=libdir kdkit)
  [ -f "$inc/kdkit/tracker.h" ] || { echo "FAIL: includedir $inc has no kdkit/tracker.h"; exit 1; }
  [ -f "$libdir/libkdkit.a" ] || { echo "FAIL: libdir $libdir has no libkdkit.a"; exit 1; }
  # shellcheck disable=SC2086
  $cc $extra "$src/tests/install_use.c" -o "$tmp/use" $(pkg-config --cflags --libs kdkit) \
      -Wl,-rpath,"$libdir" $(pkg-config --libs $deps) -lm -lpthread
  "$tmp/use" "$tmp/run-shared-$2"
  # shellcheck disable=SC2086
  $cc $extra "$src/tests/install_use.c" -o "$tmp/use-static" $(pkg-config --cflags kdkit) \
      "$libdir/libkdkit.a" $(pkg-config --libs $deps) -lm -lpthread
  "$tmp/use-static" "$tmp/run-static-$2"
  unset PKG_CONFIG_PATH
  pass=$((pass + 1))
}

# find_package(kdkit) from the prefix $1.
use_cmake() {
  cmake -S "$src/tests/install_consumer" -B "$tmp/consumer-$2" -DCMAKE_PREFIX_PATH="$1" \
        -DCMAKE_C_COMPILER="$cc" -DCMAKE_C_FLAGS="$extra" -DCMAKE_BUILD_TYPE=Debug >/dev/null
  cmake --build "$tmp/consumer-$2" >/dev/null
  "$tmp/consumer-$2/use_shared" "$tmp/run-cmake-shared-$2"
  "$tmp/consumer-$2/use_static" "$tmp/run-cmake-static-$2"
  pass=$((pass + 1))
}

# 1. a plain prefix
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
pcdir=$(dirname "$(find "$tmp/prefix" -name kdkit.pc | head -1)")
use_pkgconfig "$pcdir" prefix
use_cmake "$tmp/prefix" prefix

# 2. staged with DESTDIR under prefix /usr
DESTDIR="$tmp/stage" cmake --install "$build" --prefix /usr >/dev/null
pcdir=$(dirname "$(find "$tmp/stage/usr" -name kdkit.pc | head -1)")
use_pkgconfig "$pcdir" stage
use_cmake "$tmp/stage/usr" stage

# 3. prefix /usr with a multiarch libdir
ma=lib/x86_64-linux-gnu
cmake -S "$src" -B "$tmp/b-multiarch" -DCMAKE_INSTALL_PREFIX=/usr -DCMAKE_INSTALL_LIBDIR=$ma \
      -DKD_BUILD_TESTS=OFF -DKD_BUILD_BENCH=OFF -DCMAKE_BUILD_TYPE="$(
        sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$build/CMakeCache.txt")" >/dev/null
DESTDIR="$tmp/ma" cmake --install "$tmp/b-multiarch" --component kdkit_devel >/dev/null
[ -f "$tmp/ma/usr/$ma/pkgconfig/kdkit.pc" ] || { echo "FAIL: no $ma/pkgconfig/kdkit.pc"; exit 1; }
[ -f "$tmp/ma/usr/$ma/cmake/kdkit/kdkitConfig.cmake" ] || { echo "FAIL: no kdkitConfig.cmake"; exit 1; }
mkdir -p "$tmp/ma/usr/include"
cp -R "$tmp/prefix/include/kdkit" "$tmp/ma/usr/include/"
plib=$(dirname "$(find "$tmp/prefix" -name libkdkit.a | head -1)")
cp -P "$plib"/libkdkit.* "$tmp/ma/usr/$ma/"
use_pkgconfig "$tmp/ma/usr/$ma/pkgconfig" multiarch
use_cmake "$tmp/ma/usr" multiarch

# 4. the library alone configures without cmocka; asking for tests then fails
mkdir -p "$tmp/pc-no-cmocka"
for d in $(pkg-config --variable pc_path pkg-config | tr ':' ' '); do
  [ -d "$d" ] || continue
  for f in "$d"/*.pc; do
    [ -e "$f" ] && [ "$(basename "$f")" != cmocka.pc ] && ln -sf "$f" "$tmp/pc-no-cmocka/"
  done
done
PKG_CONFIG_LIBDIR="$tmp/pc-no-cmocka" cmake -S "$src" -B "$tmp/b-nocmocka" \
    -DKD_BUILD_BENCH=OFF >"$tmp/nocmocka.log" 2>&1 ||
  { cat "$tmp/nocmocka.log"; echo "FAIL: configure without cmocka failed"; exit 1; }
grep -q "tests off" "$tmp/nocmocka.log" || { echo "FAIL: no 'tests off' note"; exit 1; }
if PKG_CONFIG_LIBDIR="$tmp/pc-no-cmocka" cmake -S "$src" -B "$tmp/b-nocmocka2" \
    -DKD_BUILD_TESTS=ON >"$tmp/nocmocka2.log" 2>&1; then
  echo "FAIL: KD_BUILD_TESTS=ON without cmocka configured"; exit 1
fi
grep -q cmocka "$tmp/nocmocka2.log" || { echo "FAIL: the error does not name cmocka"; exit 1; }
pass=$((pass + 1))
echo "$pass passed, 0 failed: installed headers, libraries, kdkit.pc and the CMake package work; tests are optional"
