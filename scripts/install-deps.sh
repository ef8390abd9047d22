#!/bin/sh
# Install the Debian packages kdkit's build, tests and demo need.
# Quiet no-op when all are present; uses sudo when not root.
#   scripts/install-deps.sh          build + tests + demo
#   scripts/install-deps.sh --bench  also the benchmark peers (PyTorch, ...)
set -eu

pkgs="build-essential cmake pkg-config clang libclang-rt-14-dev
libcmocka-dev libjansson-dev libyaml-dev libssl-dev libcurl4-openssl-dev
libsqlite3-dev libmicrohttpd-dev libopenblas-dev jq fortunes-min
python3-numpy"
if [ "${1:-}" = "--bench" ]; then
  pkgs="$pkgs python3-torch libopenblas0 python3-aiohttp python3-diskcache"
fi

missing=""
for p in $pkgs; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
echo "kdkit: installing Debian packages:$missing" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >&2
