#!/bin/sh
# tests/progress_e2e.sh KDKIT WORK_DIR - the progress lines of `kdkit ckpt
# verify` and `kdkit cache rebuild` (each runs inside one library call; a
# thread shows the line):
# with stderr not a terminal, plain lines every $KDKIT_PROGRESS_EVERY
# seconds, and none at all for a job shorter than the default period.
set -eu
K=$1
W=$2
rm -rf "$W"
mkdir -p "$W"
fail() { echo "progress_e2e: FAIL: $*" >&2; exit 1; }
# a valid 64 MiB safetensors file: one F32 tensor of zeros
/usr/bin/python3 - "$W/big.safetensors" <<'PY'
import json, struct, sys
n = 16 * 1024 * 1024
h = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(h)))
    f.write(h)
    f.truncate(8 + len(h) + 4 * n)
PY
KDKIT_PROGRESS_EVERY=0.001 "$K" ckpt verify "$W/big.safetensors" >"$W/out" 2>"$W/err" || fail "verify: $(cat "$W/err")"
grep -q '^OK ' "$W/out" || fail "no OK line: $(cat "$W/out")"
grep -q '^kdkit ckpt verify: verifying .*big.safetensors 64.0 MiB (.* s so far)$' "$W/err" ||
  fail "no progress line: $(head -3 "$W/err")"
grep -q '^kdkit ckpt verify: verifying .* done in ' "$W/err" || fail "no end line: $(tail -2 "$W/err")"
grep -q "$(printf '\r')" "$W/err" && fail "carriage returns in a log file"
"$K" ckpt verify "$W/big.safetensors" >"$W/out2" 2>"$W/err2" || fail "verify"
[ ! -s "$W/err2" ] || fail "a short job printed progress lines: $(cat "$W/err2")"

# kdkit cache rebuild: about how much of the ledger has been read.  A ledger
# of 5000 copies of one paid line (same key: inserted once, then present).
/usr/bin/python3 - "$W/ledger.jsonl" <<'PY'
import json, sys
body = json.dumps({"id": "x", "object": "chat.completion", "model": "m", "choices": [{"index": 0,
       "message": {"role": "assistant", "content": "y" * 3000}, "finish_reason": "stop"}],
       "usage": {"prompt_tokens": 3, "completion_tokens": 3000}})
line = json.dumps({"prompt_hash": "a" * 64, "response": body, "cost": 0.001, "timestamp": 1.8e9,
                   "request_hash": "b" * 64, "sample_index": None, "prompt_tokens": 3,
                   "completion_tokens": 3000, "latency_ms": 1.0, "model": "m", "request_id": "r",
                   "teacher_version": "1"})
with open(sys.argv[1], "w") as f:
    for _ in range(5000):
        f.write(line + "\n")
PY
KDKIT_PROGRESS_EVERY=0.001 "$K" cache rebuild --cache "$W/cache.sqlite" --ledger "$W/ledger.jsonl" \
  >"$W/rb.out" 2>"$W/rb.err" || fail "cache rebuild: $(cat "$W/rb.err")"
grep -q '5000 lines, 1 inserted, 4999 already cached' "$W/rb.out" || fail "rebuild: $(cat "$W/rb.out")"
grep -q '^kdkit cache: reading the ledger .*%' "$W/rb.err" || fail "no rebuild progress line: $(head -3 "$W/rb.err")"
echo "progress_e2e: ok"
