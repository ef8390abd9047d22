#!/bin/sh
# Make `import kdkit` work in a virtual environment of Debian's
# /usr/bin/python3 that also sees the system packages (python3-numpy,
# python3-torch): the package is used in place from python/ (a kdkit.pth
# file), and finds build/libkdkit.so next to it.  `make python` runs this
# after building; nothing is downloaded.
#   scripts/python-venv.sh [VENV_DIR]      (default build/venv)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/build/venv}
python=${PYTHON:-/usr/bin/python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv --system-site-packages --without-pip "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site"
echo "$root/python" > "$site/kdkit.pth"
"$venv/bin/python" -c 'import kdkit; print("kdkit", kdkit.__version__, "with", kdkit.library_path)'
echo "use: $venv/bin/python   (or: . $venv/bin/activate)"
