#!/bin/sh
# bench/run_train.sh - end-to-end training tokens/s of `kdkit train` beside
# the same model in PyTorch, in one run, with the peak RSS of each.  Not a
# test.
#
# kdkit: the real command (data loading, tracker metrics every step, the
# final checkpoint) at 4 layers, 4 heads, width 128, context 128, batch 16,
# on the fortunes corpus; tokens/s is read from its metrics.jsonl as
# (tokens at the last step - tokens at the warm-up step) / (time between
# those two lines), so start-up is excluded and everything in the loop is
# counted.  PyTorch: bench/model_peer.py, the same GPT and optimizer step
# with torch.set_num_threads(THREADS).  Peak RSS from /usr/bin/time -v.
#
#   usage: bench/run_train.sh [BUILD_DIR=build] [threads=2] [steps=60] [warmup=10]
set -eu
cd "$(dirname "$0")/.."
BUILD=${1:-build}
THREADS=${2:-2}
STEPS=${3:-60}
WARMUP=${4:-10}
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DKD_BUILD_TESTS=OFF >/dev/null
cmake --build "$BUILD" -j2 --target kdkit_cli >/dev/null
OUT=$(mktemp -d /tmp/kdkit-bench-train-XXXXXX)
trap 'rm -rf "$OUT"' EXIT

echo "kdkit train vs PyTorch: 4 layers, 4 heads, width 128, context 128, batch 16," \
     "$THREADS threads, $STEPS steps ($WARMUP warm-up); $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg)"

/usr/bin/time -v -o "$OUT/time.txt" "$BUILD/kdkit" train --config configs/default.yaml --output-dir "$OUT/run" \
  --set model.n_layer=4 --set model.n_head=4 --set model.d_model=128 --set model.n_ctx=128 \
  --set train.batch_size=16 --set train.threads="$THREADS" --set train.steps="$STEPS" \
  --set lr.warmup_steps="$WARMUP" --set eval.every=0 --set checkpoint.every=100000 \
  --set log.every_seconds=3600 >"$OUT/train.log" 2>&1 || { cat "$OUT/train.log"; exit 1; }
RSS=$(awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2 / 1024}' "$OUT/time.txt")
/usr/bin/python3 - "$OUT/run/metrics.jsonl" "$WARMUP" "$RSS" "$THREADS" <<'EOF'
import json, sys
path, warm, rss, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lines = [json.loads(l) for l in open(path)]
a = next(l for l in lines if l["step"] == warm)
b = lines[-1]
dt = b["timestamp"] - a["timestamp"]
steps = b["step"] - a["step"]
tps = (b["tokens_processed"] - a["tokens_processed"]) / dt
print(f"kdkit train: {tps:8.0f} tokens/s  ({steps} steps after warm-up, {threads} threads, "
      f"{1e3 * dt / steps:.1f} ms/step, end to end)  peak RSS {float(rss):6.1f} MiB  "
      f"loss {b['loss']:.4f}")
EOF
/usr/bin/time -v -o "$OUT/time-py.txt" /usr/bin/python3 bench/model_peer.py "$THREADS" \
  $((STEPS - WARMUP)) "$WARMUP" >"$OUT/py.log" 2>&1 || { cat "$OUT/py.log"; exit 1; }
RSSPY=$(awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2 / 1024}' "$OUT/time-py.txt")
sed "s/^PyTorch   :/PyTorch    :/; s/peak RSS *[0-9.]* MiB/peak RSS $RSSPY MiB (time -v)/" "$OUT/py.log"
