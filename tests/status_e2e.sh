#!/bin/sh
# tests/status_e2e.sh KDKIT SOURCE_DIR WORK_DIR - `kdkit status` on a live run:
#   1. a running writer is not reported stale; stopped with SIGSTOP it is
#      ("NO PROGRESS", the process named as stopped, no ETA promised);
#   2. `status --watch` keeps refreshing while the run goes and exits 0 by
#      itself once the run ends (SIGTERM releases the lock);
#   3. on a finished run (no writer) --watch shows it once and exits;
#   4. a real `kdkit mix` stopped by its budget: status's mix block and the
#      report's mix table agree with mix_progress.json.
# Also: kdkit report beside the running writer.
set -eu
K=$1
SRC=$2
W=$3
rm -rf "$W"
mkdir -p "$W"
RUN=$W/run
fail() { echo "status_e2e: FAIL: $*" >&2; [ -n "${pid:-}" ] && kill -CONT $pid 2>/dev/null && kill -KILL $pid 2>/dev/null; exit 1; }
( exec "$K" train --config "$SRC/configs/tiny-test.yaml" --output-dir "$RUN" --set train.steps=100000 >"$W/train.log" 2>&1 ) &
pid=$!
i=0
while [ ! -s "$RUN/metrics.jsonl" ]; do
  i=$((i + 1)); [ $i -lt 3000 ] || fail "no metrics after 60 s"
  kill -0 $pid 2>/dev/null || fail "train ended early: $(tail -3 "$W/train.log")"
  sleep 0.02
done
"$K" status "$RUN" --stale-after 30 >"$W/live.txt" || fail "status of a live run"
grep -q "Writer:       running (process $pid holds" "$W/live.txt" || fail "the writer is not seen: $(cat "$W/live.txt")"
grep -q "NO PROGRESS" "$W/live.txt" && fail "a running writer is reported stale"
# report beside a running writer: no lock taken, a whole page
"$K" report "$RUN" -o "$W/live.html" --quiet || fail "report beside a running writer"
grep -q 'data-series="loss" data-points="[1-9]' "$W/live.html" || fail "the live report has no loss points"
tail -c 20 "$W/live.html" | grep -q '</html>' || fail "the live report is cut short"
kill -STOP $pid
sleep 2.5
"$K" status "$RUN" --stale-after 1 >"$W/stopped.txt" || fail "status of a stopped run"
grep -q "NO PROGRESS for" "$W/stopped.txt" || fail "a stopped writer is not reported: $(cat "$W/stopped.txt")"
grep -q "the process is stopped" "$W/stopped.txt" || fail "SIGSTOP not named: $(cat "$W/stopped.txt")"
grep -q "^ETA:          none: no progress for" "$W/stopped.txt" || fail "an ETA is promised for a stopped writer"
kill -CONT $pid

# --watch, not a terminal: one block per interval, exit when the run ends
( exec "$K" status "$RUN" --watch --interval 0.2 >"$W/watch.txt" 2>&1 ) &
wpid=$!
sleep 1
kill -0 $wpid 2>/dev/null || fail "--watch ended while the run was going: $(tail -3 "$W/watch.txt")"
kill -TERM $pid
wait $pid || fail "train after SIGTERM exited $?"
pid=
i=0
while kill -0 $wpid 2>/dev/null; do
  i=$((i + 1)); [ $i -lt 500 ] || { kill $wpid; fail "--watch did not exit after the run ended"; }
  sleep 0.02
done
wait $wpid || fail "--watch exited $?"
[ "$(grep -c '^--- ' "$W/watch.txt")" -ge 2 ] || fail "--watch did not refresh: $(cat "$W/watch.txt")"
tail -1 "$W/watch.txt" | grep -q "the run has ended" || fail "--watch did not say why it ended"
"$K" status "$RUN" --watch --interval 100 >"$W/watch2.txt" || fail "--watch on a stopped run"
[ "$(grep -c '^--- ' "$W/watch2.txt")" -eq 1 ] || fail "--watch on a run that has ended showed more than once"

# 4. a real mix against kdkit serve --toy (a 503 and a dropped body), stopped
#    by its budget: status and report show what mix_progress.json says
M=$W/mix
mkdir -p "$M"
"$K" serve --toy --port 0 --port-file "$W/port" --fault-script 'ok,503,ok,drop,ok*100' >"$W/serve.log" 2>&1 &
spid=$!
i=0
while [ ! -s "$W/port" ]; do i=$((i + 1)); [ $i -lt 500 ] || fail "serve did not start"; sleep 0.02; done
for n in $(seq 1 30); do echo "{\"id\": \"p$n\", \"prompt\": \"question $n about distillation\"}"; done >"$M/prompts.jsonl"
sed "s#http://127.0.0.1:8088/v1#http://127.0.0.1:$(cat "$W/port")/v1#; s#max_cost: 1.00#max_cost: 0.0006#" \
  "$SRC/configs/mix-example.yaml" >"$M/mix.yaml"
"$K" mix --config "$M/mix.yaml" --prompts "$M/prompts.jsonl" --output-dir "$M/out" >"$W/mix.log" 2>&1 || true
kill $spid; wait $spid 2>/dev/null || true
grep -q "budget reached" "$W/mix.log" || fail "the mix did not stop at its budget: $(tail -3 "$W/mix.log")"
"$K" status "$M/out" >"$W/mix.txt" || fail "status of a mix directory: $(cat "$W/mix.txt")"
/usr/bin/python3 - "$M/out/mix_progress.json" "$W/mix.txt" <<'PY' || fail "status disagrees with mix_progress.json: $(cat "$W/mix.txt")"
import json, sys
p = json.load(open(sys.argv[1]))
out = open(sys.argv[2]).read()
c = p["counts"]
want = [
    "Mix:          %d/%d samples (%.1f%%): %d ok, %d refused, %d failed, %d skipped; state budget"
    % (p["completed"], p["total"], 100.0 * p["completed"] / p["total"], c["ok"], c["refused"], c["failed"], c["skipped"]),
    "Mix cost:     spent %.6f of budget %.6f" % (p["spent"], p["budget"]),
    "Projected:    the rest %.6f expected, %.6f worst case -> %.6f expected in all (OVER the budget"
    % (p["projected_rest"]["expected"], p["projected_rest"]["worst"], p["spent"] + p["projected_rest"]["expected"]),
    "Budget:       spent %.6f of %.6f" % (p["spent"], p["budget"]),
]
bad = [w for w in want if w not in out]
for w in bad:
    print("missing: " + w)
sys.exit(1 if bad else 0)
PY
"$K" report "$M/out" -o "$W/mix.html" --quiet || fail "report of a mix directory"
grep -q '<table class="kv" data-table="mix"><tr><td>samples</td>' "$W/mix.html" || fail "no mix table in the report"
grep -q 'data-kind="budget" data-value="0.0006"' "$W/mix.html" || fail "no budget line from the mix's progress file"
echo '{"format": "kdkit-mix-progress", "version": 1}' >"$M/out/mix_progress.json"
if "$K" status "$M/out" >/dev/null 2>"$W/mix.err"; then fail "status shows a mix_progress.json the validator refuses"; fi
grep -q "mix_progress.json" "$W/mix.err" || fail "the refusal does not name the file: $(cat "$W/mix.err")"
echo "status_e2e: ok"
