#!/bin/sh
# tests/status_e2e.sh KDKIT SOURCE_DIR WORK_DIR - `kdkit status` on a live run:
#   1. a running writer is not reported stale; stopped with SIGSTOP it is
#      ("NO PROGRESS", the process named as stopped, no ETA promised);
#   2. `status --watch` keeps refreshing while the run goes and exits 0 by
#      itself once the run ends (SIGTERM releases the lock);
#   3. on a finished run (no writer) --watch shows it once and exits;
#   4. a mix directory's block.  Also: kdkit report beside the running writer.
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

# 4. a mix directory (mix_progress.json as docs/mix.md of the mix defines it;
#    written here by hand until kdkit mix is on main), with a hostile state
M=$W/mix
mkdir -p "$M"
cat >"$M/mix_progress.json" <<'JSON'
{"format": "kdkit-mix-progress", "version": 1, "identity": "i", "config_hash": "c",
 "prompts_sha256": "p", "prompts_validated": true, "total": 1000, "completed": 640,
 "completed_ranges": [[0, 639]], "failed_ranges": [[17, 17]], "refused_ranges": [],
 "skipped_ranges": [], "counts": {"ok": 639, "refused": 0, "failed": 1, "skipped": 0},
 "mix_bytes": 1234567, "mix_rows": 641, "cache_hits": 12, "paid_rows": 628,
 "paid_cost": 0.031, "spent": 0.0312, "reserved": 0, "budget": 0.05,
 "projected_rest": {"expected": 0.0178, "worst": 0.041}, "rate": 412.5, "eta_s": 90,
 "ledger_bytes": 998877, "ledger_lines": 628, "resume_index": 640, "prompts_offset": 51234,
 "state": "running\u001b[2J", "updated_at": 1763352435.1}
JSON
"$K" status "$M" >"$W/mix.txt" || fail "status of a mix directory: $(cat "$W/mix.txt")"
grep -q '^Mix:          640/1000 samples (64.0%): 639 ok, 0 refused, 1 failed, 0 skipped; state running\\x1b\[2J$' "$W/mix.txt" ||
  fail "mix progress: $(cat "$W/mix.txt")"
grep -q '^Mix cost:     spent 0.031200 of budget 0.050000 (62.4%)' "$W/mix.txt" || fail "mix spend: $(cat "$W/mix.txt")"
grep -q '^Projected:    the rest 0.017800 expected, 0.041000 worst case -> 0.049000 expected in all$' "$W/mix.txt" ||
  fail "mix projection: $(cat "$W/mix.txt")"
grep -q '^Mix ETA:      2 min at 412 samples/s$' "$W/mix.txt" || fail "mix ETA: $(cat "$W/mix.txt")"
echo '{"format": "something-else", "version": 1}' >"$M/mix_progress.json"
if "$K" status "$M" >/dev/null 2>"$W/mix.err"; then fail "an unknown mix_progress.json format is shown"; fi
echo "status_e2e: ok"
