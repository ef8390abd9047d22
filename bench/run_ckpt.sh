#!/bin/sh
# bench/run_ckpt.sh - checkpoint benchmark with its peers, in one run:
#   1. raw sequential write+fsync bandwidth: dd if=/dev/zero bs=1M conv=fsync
#   2. bench_ckpt: kdkit write (atomic, fsync'd, XXH3-128) and load+verify
#   3. bench/ckpt_peer.py: torch.save (+fsync) and torch.load of the same
#      tensors, with Debian's /usr/bin/python3 and python3-torch
# then prints the figures and the ratios the issue asks for:
#   write >= 95% of raw dd, load+verify >= 2x torch.load hot and cold.
#
#   bench/run_ckpt.sh [BUILD_DIR] [DIR] [MB] [REPS]
# BUILD_DIR defaults to build, which must hold bench/bench_ckpt built without
# sanitizers (make bench does that); DIR to a new
# directory under the current one (it must be on the disk you care about;
# /tmp may be a RAM disk); MB to 300; REPS to 3.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-build}/bench/bench_ckpt
dir=${2:-}
mb=${3:-300}
reps=${4:-3}
if [ ! -x "$bin" ]; then
  echo "run_ckpt.sh: no bench binary at $bin (cmake --build build --target bench_ckpt)" >&2
  exit 2
fi
own_dir=0
if [ -z "$dir" ]; then
  dir=$(mktemp -d ./kdkit-bench-ckpt.XXXXXX)
  own_dir=1
fi
cleanup() {
  rm -f "$dir/dd.bin" "$dir/bench_ckpt.safetensors" "$dir/bench_peer.pt"
  if [ "$own_dir" = 1 ]; then rmdir "$dir" 2>/dev/null || true; fi
}
trap cleanup EXIT

echo "== machine: $(nproc) cores, $(df -h "$dir" | awk 'NR==2 {print $1 " " $2}'), $mb MB, best of $reps"

# 1. raw bandwidth: best of REPS
count=$(awk -v mb="$mb" 'BEGIN { printf "%d", mb * 1e6 / 1048576 + 0.5 }')
best_dd=0
i=0
while [ $i -lt "$reps" ]; do
  rm -f "$dir/dd.bin"
  sync
  out=$(LC_ALL=C dd if=/dev/zero of="$dir/dd.bin" bs=1M count="$count" conv=fsync 2>&1 | tail -1)
  # "N bytes (...) copied, S s, R MB/s": compute from N and S for precision
  r=$(echo "$out" | awk '{ for (k = 1; k <= NF; k++) if ($k == "s,") s = $(k-1); printf "%.0f", $1 / s / 1e6 }')
  best_dd=$(awk -v a="$best_dd" -v b="$r" 'BEGIN { print (b > a ? b : a) }')
  i=$((i + 1))
done
rm -f "$dir/dd.bin"
echo "dd_write_fsync_MBps $best_dd"

# 2. kdkit
kd=$("$bin" "$dir" "$mb" "$reps")
echo "$kd"

# 3. torch
if /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  pt=$(/usr/bin/python3 "$here/ckpt_peer.py" "$dir" "$reps")
  echo "$pt"
else
  echo "run_ckpt.sh: /usr/bin/python3 cannot import torch (scripts/install-deps.sh --bench)" >&2
  pt=""
fi

get() { echo "$kd
$pt" | awk -v k="$1" '$1 == k { print $2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

w=$(get kdkit_write_MBps)
lh=$(get kdkit_load_verify_hot_MBps)
lc=$(get kdkit_load_verify_cold_MBps)
th=$(get torch_load_hot_MBps)
tc=$(get torch_load_cold_MBps)
ch=$(get kdkit_load_copy_hot_MBps)
cc=$(get kdkit_load_copy_cold_MBps)
ts=$(get torch_save_fsync_MBps)
echo "== ratios"
echo "kdkit write / dd conv=fsync:               $(ratio "$w" "$best_dd")  (target >= 0.95)"
echo "kdkit load+verify / torch.load (hot):      $(ratio "$lh" "${th:-0}")  (target >= 2)"
echo "kdkit load+verify / torch.load (cold):     $(ratio "$lc" "${tc:-0}")  (target >= 2)"
rc=$(get raw_read_cold_MBps)
echo "cold read() of the same file, one stream of 4 MiB reads: ${rc:-?} MB/s;" \
     "kdkit load+verify is $(ratio "$lc" "${rc:-0}")x that, torch.load $(ratio "${tc:-0}" "${rc:-0}")x"
echo "kdkit load+copy (no hash) / torch.load (hot):  $(ratio "$ch" "${th:-0}")"
echo "kdkit load+copy (no hash) / torch.load (cold): $(ratio "$cc" "${tc:-0}")"
echo "kdkit write / torch.save+fsync:            $(ratio "$w" "${ts:-0}")"
echo "kdkit write with SHA-256 too / dd:         $(ratio "$(get kdkit_write_sha256_MBps)" "$best_dd")  (checkpoint.hash: sha256)"
echo "kdkit load+verify SHA-256 / torch (hot):   $(ratio "$(get kdkit_load_verify_sha256_hot_MBps)" "${th:-0}")  (a manifest from before XXH3)"
# for bench/run.sh's closing table
target() { # what ours peer peername min [note]
  r=$(ratio "$2" "$3")
  ok=$(awk -v r="$r" -v t="$5" 'BEGIN { print (r != "n/a" && r + 0 >= t ? "met" : "NOT met") }')
  echo "target: $1 | ${r}x ($2 vs $3 MB/s $4${6:+; $6}) | >= ${5}x | $ok"
}
target "ckpt write / dd conv=fsync" "$w" "$best_dd" "dd" 0.95
target "ckpt load+verify / torch.load, hot" "$lh" "${th:-0}" "torch" 2
target "ckpt load+verify / torch.load, cold" "$lc" "${tc:-0}" "torch" 2 "one-stream cold read() ${rc:-?} MB/s"
