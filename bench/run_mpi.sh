#!/bin/sh
# bench/run_mpi.sh - data-parallel `kdkit train` on this machine, and a paper
# projection to 8 machines (docs/distributed.md).  Not a test.
#
# Three runs of the default model (4 layers, width 128, context 128, batch 16)
# on the fortunes corpus, STEPS steps each, tokens/s from metrics.jsonl
# after WARMUP steps (as bench/run_train.sh):
#   plain   1 process, 2 threads, train.micro_batch 0 (the batch in one piece)
#   mb1     1 process, 2 threads, train.micro_batch 1 (the rank-independent
#           step: 16 micro-batches of one sequence)
#   np2     mpirun -np 2, 1 thread each, train.micro_batch 1
#   np1t1   1 process, 1 thread, micro_batch 1: the compute a rank does per
#           micro-batch, which the projection uses
# np2's losses must equal mb1's only at the same thread count; the figures
# here compare speed.  The bytes a step moves come from the run's own
# "data-parallel" line.  Needs Open MPI (scripts/install-deps.sh).
#
#   usage: bench/run_mpi.sh [BUILD_DIR=build] [steps=14] [warmup=4]
set -eu
cd "$(dirname "$0")/.."
BUILD=${1:-build}
STEPS=${2:-14}
WARMUP=${3:-4}
command -v mpirun >/dev/null || { echo "bench/run_mpi.sh: mpirun not found (apt-get install openmpi-bin libopenmpi-dev)"; exit 0; }
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DKD_BUILD_TESTS=OFF >/dev/null
cmake --build "$BUILD" -j2 --target kdkit_cli >/dev/null
OUT=$(mktemp -d /tmp/kdkit-bench-mpi-XXXXXX)
trap 'rm -rf "$OUT"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

echo "kdkit train data-parallel: 4 layers, width 128, context 128, batch 16, $STEPS steps" \
     "($WARMUP warm-up); $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg) (shared with other builds)"
run() { # name launcher threads micro_batch
  $2 "$BUILD/kdkit" train --config configs/default.yaml --output-dir "$OUT/$1" \
    --set train.threads="$3" --set train.micro_batch="$4" --set train.steps="$STEPS" \
    --set lr.warmup_steps="$WARMUP" --set eval.every=0 --set checkpoint.every=100000 \
    --set log.every_seconds=3600 >"$OUT/$1.log" 2>&1 || { cat "$OUT/$1.log"; exit 1; }
}
run plain "" 2 0
run mb1 "" 2 1
run np2 "mpirun --oversubscribe -np 2" 1 1
run np1t1 "" 1 1
BYTES=$(sed -n 's/.*broadcast of its sum move \([0-9]*\) bytes.*/\1/p' "$OUT/np2.log" | head -1)
PARAMS=$(sed -n 's/.*: \([0-9]*\) parameters;.*/\1/p' "$OUT/plain.log" | head -1)
/usr/bin/python3 - "$OUT" "$WARMUP" "$BYTES" "$PARAMS" <<'PY'
import json, sys
out, warm, nbytes, P = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def rate(name):
    lines = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
    a = next(l for l in lines if l["step"] == warm); b = lines[-1]
    dt = b["timestamp"] - a["timestamp"]
    return (b["tokens_processed"] - a["tokens_processed"]) / dt, dt / (b["step"] - a["step"])
r = {n: rate(n) for n in ("plain", "mb1", "np2", "np1t1")}
for n, label in (("plain", "1 rank  x 2 threads, batch in one piece (micro_batch 0)"),
                 ("mb1", "1 rank  x 2 threads, 16 micro-batches (micro_batch 1)"),
                 ("np2", "2 ranks x 1 thread,  16 micro-batches (mpirun -np 2)"),
                 ("np1t1", "1 rank  x 1 thread,  16 micro-batches")):
    print(f"  {label}: {r[n][0]:8.0f} tokens/s  {1e3 * r[n][1]:7.1f} ms/step")
print(f"  2 ranks x 1 thread vs 1 rank x 2 threads (same micro-batches): {r['np2'][0] / r['mb1'][0]:.2f}x;"
      f" micro-batching's own cost at 2 threads: {r['mb1'][0] / r['plain'][0]:.2f}x of the one-piece rate")
# The gradient tree of mbstep.c (docs/distributed.md): C messages of 4P bytes
# in H levels for M micro-batches over N ranks.
def tree(M, N):
    first = lambda r: r * M // N
    owner = lambda j: max(r for r in range(N) if first(r) <= j)
    L = 0
    while (1 << L) < M:
        L += 1
    C = H = 0
    for l in range(L):
        here = sum(owner(a) != owner(a + (1 << l)) for a in range(0, M, 2 << l) if a + (1 << l) < M)
        C += here
        H += here > 0
    return L, C, H
M = 16
L2, C2, H2 = tree(M, 2)
print(f"  bytes per step (2 ranks): {nbytes} = (C + N - 1) x {P} parameters x 4, C = {C2} tree"
      f" message(s) in {H2} level(s), depth {L2}; plus 48 bytes per micro-batch of counts and"
      f" loss figures and a few 4-byte agreements")
# Paper projection: N machines, each rank computes ceil(M/N) micro-batches,
# then the tree: H levels, each one hop of the gradient (4P bytes) and a
# fold of P adds, then the broadcast (pipelined: ~4P / bw + log2 N
# latencies).  Measured: t_mb = one micro-batch's compute on one thread
# (np1t1 step / 16); assumed: 10 Gbit/s links (1.25e9 B/s), 50 us latency,
# P float adds at 1e9 adds/s.
import math
N, bw, lat, adds = 8, 1.25e9, 50e-6, 1e9
L8, C8, H8 = tree(M, N)
t_mb = r["np1t1"][1] / M
for label, scale in (("default model", 1), ("10x wider (d_model 1280: ~100x parameters)", 100)):
    p = P * scale; tm = t_mb * scale
    comp = math.ceil(M / N) * tm
    hop = 4 * p / bw + lat + p / adds
    comm = H8 * hop + 4 * p / bw + math.log2(N) * lat
    chain = (N - 1) * hop + 4 * p / bw + math.log2(N) * lat
    one = M * tm
    print(f"  projection, {N} machines, {label}: P = {p:.3g}, compute {1e3 * comp:.1f} ms"
          f" (= ceil(M/N) x t_mb, t_mb = {1e3 * tm:.2f} ms) + communication {1e3 * comm:.1f} ms"
          f" (= H (4P/bw + lat + P/adds) + 4P/bw + log2(N) lat, H = {H8}; {C8 + N - 1} x 4P bytes)"
          f" = {1e3 * (comp + comm):.1f} ms/step vs {1e3 * one:.1f} ms on one machine x 1 thread:"
          f" {one / (comp + comm):.2f}x (a chain of N - 1 hops instead: communication {1e3 * chain:.1f} ms,"
          f" {one / (comp + chain):.2f}x)")
PY
