#!/bin/sh
# Install the Debian packages kdkit's build, tests and demo need.
# Quiet no-op when all are present; uses sudo when not root.
#   scripts/install-deps.sh          build + tests + demo
#   scripts/install-deps.sh --bench  also the benchmark peers (aiohttp, ...)
# python3-torch is in the test set: the Python binding's tests (tests/python)
# train a real torch model (python3-torch, libtorch1.13 and libtorch-test are
# 230 MB installed; with their dependencies ~170 packages, about 30 s here).
# python3-venv: `make python` makes a virtual environment.
# chromium: tests/report_e2e.sh renders `kdkit report` headless and checks its DOM.
# libopenmpi-dev, openmpi-bin: the MPI build of kdkit train and its tests
# (tests/mpi.cmake, docs/distributed.md).
set -eu

pkgs="build-essential cmake pkg-config clang libclang-rt-14-dev
libcmocka-dev libjansson-dev libyaml-dev libssl-dev libcurl4-openssl-dev
libsqlite3-dev libmicrohttpd-dev libopenblas-dev jq fortunes-min
python3-numpy
python3-torch python3-venv libxxhash-dev libomp-dev
chromium fonts-dejavu-core
libopenmpi-dev openmpi-bin"
if [ "${1:-}" = "--bench" ]; then
  pkgs="$pkgs libopenblas0 python3-aiohttp python3-diskcache"
fi

# The OpenAI SDK compatibility test (tests/openai_sdk) needs node and npm;
# Debian's are used when the machine has none of its own.
command -v node >/dev/null 2>&1 || pkgs="$pkgs nodejs"
command -v npm >/dev/null 2>&1 || pkgs="$pkgs npm"

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
