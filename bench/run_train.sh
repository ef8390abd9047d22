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
# Also, in the same run: the sgemm rate at the model's shapes (bench_model
# sgemm) and the fraction of it `kdkit train` reaches (target >= 65%), and
# how many CPUs the run got (docs/model.md, "Threads").
#
#   usage: bench/run_train.sh [BUILD_DIR=build] [threads=2] [steps=60] [warmup=10]
set -eu
cd "$(dirname "$0")/.."
BUILD=${1:-build}
THREADS=${2:-2}
STEPS=${3:-60}
WARMUP=${4:-10}
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DKD_BUILD_TESTS=OFF >/dev/null
cmake --build "$BUILD" -j2 --target kdkit_cli bench_model >/dev/null
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
# The CPUs the run really got (user+sys / wall, whole run): with autogroup
# scheduling on, processes of another session, even at nice 19, keep their
# session's share, and the fraction below then measures the scheduler.
CPUS=$(awk -F': ' '/Percent of CPU this job got/ {sub("%", "", $2); printf "%.2f", $2 / 100}' "$OUT/time.txt")
echo "kdkit train: got $CPUS CPUs of $THREADS threads (autogroup" \
     "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo '?'))"
SGEMM=$(OPENBLAS_NUM_THREADS=$THREADS "$BUILD/bench/bench_model" sgemm "$THREADS" | awk '{print $2}')
/usr/bin/python3 - "$OUT/run/metrics.jsonl" "$WARMUP" "$RSS" "$THREADS" "$SGEMM" "$OUT/tps" <<'EOF'
import json, sys
path, warm, rss, threads, sgemm = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
tps_file = sys.argv[6]
lines = [json.loads(l) for l in open(path)]
a = next(l for l in lines if l["step"] == warm)
b = lines[-1]
dt = b["timestamp"] - a["timestamp"]
steps = b["step"] - a["step"]
tps = (b["tokens_processed"] - a["tokens_processed"]) / dt
print(f"kdkit train: {tps:8.0f} tokens/s  ({steps} steps after warm-up, {threads} threads, "
      f"{1e3 * dt / steps:.1f} ms/step, end to end)  peak RSS {float(rss):6.1f} MiB  "
      f"loss {b['loss']:.4f}")
# matrix FLOPs per token of a training step (3x forward; bench/bench_model.c)
B, T, C, L, V = 16, 128, 128, 4, 256
flops_tok = 3.0 * (24.0 * C * C * L + 2.0 * T * C * L + 2.0 * C * V)
gf = tps * flops_tok / 1e9
print(f"kdkit train: {gf:.1f} GFLOP/s; sgemm at the model's shapes {sgemm:.1f} GFLOP/s in this run: "
      f"{100 * gf / sgemm:.0f}%")
print(f"target: kdkit train / sgemm at the model's shapes | {100 * gf / sgemm:.0f}% ({gf:.0f} vs {sgemm:.0f} GFLOP/s) | >= 65% | "
      + ("met" if gf >= 0.65 * sgemm else "NOT met"))
with open(tps_file, "w") as f:
    f.write(f"{tps}\n")
EOF
/usr/bin/time -v -o "$OUT/time-py.txt" /usr/bin/python3 bench/model_peer.py "$THREADS" \
  $((STEPS - WARMUP)) "$WARMUP" >"$OUT/py.log" 2>&1 || { cat "$OUT/py.log"; exit 1; }
RSSPY=$(awk -F': ' '/Maximum resident set size/ {printf "%.1f", $2 / 1024}' "$OUT/time-py.txt")
sed "s/^PyTorch   :/PyTorch    :/; s/peak RSS *[0-9.]* MiB/peak RSS $RSSPY MiB (time -v)/" "$OUT/py.log"
awk -v a="$(cat "$OUT/tps")" '/^PyTorch/ { for (i = 1; i <= NF; i++) if ($i == "tokens/s") p = $(i - 1) }
  END { if (p > 0) printf "target: kdkit train tokens/s vs PyTorch | %.2fx (%.0f vs %.0f) | > 1x | %s\n", a / p, a, p, (a > p ? "met" : "NOT met") }' "$OUT/py.log"
