#!/bin/sh
# tests/report_e2e.sh KDKIT SOURCE_DIR WORK_DIR - `kdkit report` of a real run,
# looked at in a real browser:
#   1. a short `kdkit train` (configs/tiny-test.yaml) stopped by SIGTERM (a
#      pause), resumed, killed by SIGKILL past a checkpoint (so the resume
#      rewinds and metrics.rewound.jsonl gets the abandoned lines), resumed to
#      the end;
#   2. `kdkit teacher ask` against `kdkit serve --toy` with injected faults
#      (503, a dropped body, a stall past the timeout, 500s, quota), whose
#      ledger and failure lines are appended to the run, as a distillation run
#      writes them;
#   3. the report rendered by headless Chromium: a screenshot is taken, no
#      console message, and the DOM (--dump-dom) checked by report_check.py
#      against the run's own files (points per plot, markers at the steps);
#   4. hostile text (a session id and an error with <script> and terminal
#      escapes) comes out escaped in the page and in `kdkit status`;
#   5. a 200k-line metrics log: the page stays under 2 MB (size only, never
#      time) and a one-step spike survives the downsampling.
# The screenshot is left at WORK_DIR/report.png (docs/report.png is a copy).
set -eu
K=$1
SRC=$2
W=$3
PY=/usr/bin/python3
rm -rf "$W"
mkdir -p "$W"
RUN=$W/run
fail() { echo "report_e2e: FAIL: $*" >&2; exit 1; }
tail_step() { # the step of the last whole line of metrics.jsonl (0 if none)
  [ -s "$RUN/metrics.jsonl" ] || { echo 0; return; }
  tail -c 4096 "$RUN/metrics.jsonl" | sed -n 's/^{"step":\([0-9]*\),.*}$/\1/p' | tail -n 1 | grep . || echo 0
}
train() { # exec: in the background, $! is then kdkit itself
  exec "$K" train --config "$SRC/configs/tiny-test.yaml" --output-dir "$RUN" \
    --set train.steps=600 --set train.batch_size=8 --set checkpoint.every=300 "$@" >>"$W/train.log" 2>&1
}

# 1. the run
(train) &
pid=$!
i=0
while [ "$(tail_step)" -lt 40 ]; do
  i=$((i + 1)); [ $i -lt 3000 ] || fail "no metrics after 60 s"
  kill -0 $pid 2>/dev/null || fail "train ended before SIGTERM"
  sleep 0.02
done
kill -TERM $pid
wait $pid || fail "train after SIGTERM exited $?"
(train --resume auto) &
pid=$!
i=0
while [ "$(tail_step)" -lt 315 ]; do
  i=$((i + 1)); [ $i -lt 3000 ] || fail "no progress after 60 s"
  kill -0 $pid 2>/dev/null || fail "train ended before SIGKILL (machine too fast for this test?)"
  sleep 0.02
done
kill -KILL $pid
wait $pid 2>/dev/null || true
(train --resume auto) || fail "final resume failed: $(tail -5 "$W/train.log")"
[ -s "$RUN/metrics.rewound.jsonl" ] || fail "the SIGKILL left nothing to rewind"

# 2. the teacher, with faults
"$K" serve --toy --port 0 --port-file "$W/port" --stall-ms 3000 \
  --fault-script 'ok,503,drop,ok,stall,ok,500,500,quota,ok,ok' >"$W/serve.log" 2>&1 &
spid=$!
i=0
while [ ! -s "$W/port" ]; do i=$((i + 1)); [ $i -lt 500 ] || fail "serve did not start"; sleep 0.02; done
cat >"$W/teacher.yaml" <<EOF
teacher:
  base_url: http://127.0.0.1:$(cat "$W/port")/v1
  model: kdkit-toy
  teacher_version: "1"
  prices: {input_per_million: 150, output_per_million: 600}
  budget: {max_cost: 0.2}
  retry: {max_attempts: 3, base_delay_ms: 10, max_delay_ms: 20, deadline_s: 30}
  timeouts: {connect_ms: 1000, total_ms: 1000}
  cache: {path: $W/cache.sqlite}
  defaults: {max_tokens: 16}
EOF
for n in 1 2 3 4 5 6 7; do
  "$K" teacher ask --config "$W/teacher.yaml" --output-dir "$W/teacher" "prompt $n" >>"$W/ask.log" 2>&1 || true
done
kill $spid; wait $spid 2>/dev/null || true
cat "$W/teacher/api_recovery.jsonl" >>"$RUN/api_recovery.jsonl"
cat "$W/teacher/failures.jsonl" >>"$RUN/failures.jsonl"
cp "$W/teacher/teacher_intents.jsonl" "$RUN/"

# status counts the budget as the client does: paid + possibly billed
spent=$(sed -n 's/^spent: \([0-9.]*\) of budget.*/\1/p' "$W/ask.log" | tail -n 1)
[ -n "$spent" ] || fail "teacher ask printed no spend: $(tail -3 "$W/ask.log")"
"$K" status "$W/teacher" >"$W/teacher.status" || fail "status of the teacher directory"
grep -q "^Budget:       spent $spent of 0.200000" "$W/teacher.status" ||
  fail "status's budget is not the client's ($spent): $(grep Budget "$W/teacher.status")"
grep -q "possibly billed (worst case)" "$W/teacher.status" || fail "status hides the possibly-billed part"

# 3. the report in a browser
"$K" report "$RUN" -o "$W/report.html" --budget 0.2 2>"$W/report.err" || fail "report: $(cat "$W/report.err")"
grep -q 'src=\|href=\|@import\|url(' "$W/report.html" && fail "the page loads something"
chrome() {
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$W/chrome" \
    --enable-logging=stderr --v=0 "$@"
}
# the console check itself must be able to fail: a page that logs is seen
printf '<html><body><script>console.error("kdkit-probe")</script></body></html>' >"$W/probe.html"
chrome --dump-dom "file://$W/probe.html" >/dev/null 2>"$W/probe.err" || true
grep -q 'CONSOLE.*kdkit-probe' "$W/probe.err" || fail "cannot see console messages: $(tail -3 "$W/probe.err")"
chrome --dump-dom "file://$W/report.html" >"$W/dom.html" 2>"$W/chrome.err" || fail "chromium --dump-dom failed"
grep 'CONSOLE' "$W/chrome.err" && fail "the page logged to the console"
chrome --screenshot="$W/report.png" --window-size=1040,3400 "file://$W/report.html" >/dev/null 2>&1 ||
  fail "no screenshot"
[ "$(head -c 8 "$W/report.png" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] || fail "the screenshot is not a PNG"
[ "$(wc -c <"$W/report.png")" -gt 20000 ] || fail "the screenshot is nearly empty"
$PY "$SRC/tests/report_check.py" "$W/dom.html" "$RUN" --budget 0.2 --teacher --rewound || fail "DOM checks"
# the teacher's own directory: the budget comes from its session's config
"$K" report "$W/teacher" -o "$W/teacher.html" --quiet || fail "report of the teacher directory"
grep -q 'data-kind="budget" data-value="0.2"' "$W/teacher.html" || fail "no budget line from the config"

# 4. hostile text
H=$W/hostile
cp -r "$RUN" "$H"
$PY - "$H" <<'EOF'
import json, sys
d = sys.argv[1]
bad = 'training_<script>alert(1)</script>\u001b[31mRED\u001b]0;title\u0007'
with open(d + "/session.json") as f:
    s = json.load(f)
s["session_id"] = bad
with open(d + "/session.json", "w") as f:
    json.dump(s, f)
with open(d + "/failures.jsonl", "a") as f:
    f.write(json.dumps({"retry_count": 0, "error": "<script>alert('x')</script>\u001b[2J<img src=x onerror=alert(1)>",
                        "time": 1.8e9, "http_status": 0, "possibly_billed": False, "request_hash": "<b>"}) + "\n")
EOF
# a mix progress file that the mix's validator refuses, with hostile text
printf '{"format": "kdkit-mix-progress", "version": 1, "identity": "<script>x</script>\033[2J"}' >"$H/mix_progress.json"
# KD figures as the distillation helper adds them to eval.jsonl, one key hostile
$PY - "$H/eval.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "a") as f:
    for i in range(1, 8):
        f.write(json.dumps({"step": 600 + 10 * i, "val_loss": 2.5, "student_bpb": 3.0 - 0.1 * i,
                            "teacher_bpb": 1.2, "gap": 1.8 - 0.1 * i, "first_byte_agreement": 0.3 + 0.05 * i,
                            "samples": 8, "bytes": 900,
                            "<script>k</script>": 1}) + "\n")
PY
"$K" report "$H" -o "$W/hostile.html" --quiet || fail "report of the hostile directory"
for k in gap first_byte_agreement; do
  grep -q "<figure class=\"chart\" data-plot=\"eval-$k\">.*data-series=\"$k\" data-points=\"7\"" "$W/hostile.html" ||
    fail "no KD chart of $k with 7 points"
done
grep '<figure class="chart" data-plot="eval-bpb">' "$W/hostile.html" | grep 'data-series="student_bpb" data-points="7"' |
  grep -q 'data-series="teacher_bpb" data-points="7"' || fail "student and teacher bits per byte are not on one chart"
grep -q 'data-plot="eval-samples"\|data-plot="eval-bytes"' "$W/hostile.html" && fail "counts drawn as KD figures"
grep -q '<p class="warn" data-table="mix">.*mix_progress.json' "$W/hostile.html" || fail "an invalid mix_progress.json is not flagged"
grep -qi '<script\|<img\|<b>' "$W/hostile.html" && fail "hostile markup reached the page"
grep -q "$(printf '\033')" "$W/hostile.html" && fail "a terminal escape reached the page"
grep -q '&lt;script&gt;alert(1)&lt;/script&gt;' "$W/hostile.html" || fail "the hostile session id is not shown escaped"
"$K" status "$H" >"$W/hostile.status" 2>&1 || true
grep -q "$(printf '\033')" "$W/hostile.status" && fail "a terminal escape reached kdkit status"
grep -q 'training_<script>alert(1)</script>\\x1b\[31mRED' "$W/hostile.status" || fail "status does not show the id escaped: $(head -3 "$W/hostile.status")"

# 5. a long log: bounded page, spikes kept
B=$W/big
cp -r "$RUN" "$B"
last=$(tail_step)
$PY - "$B/metrics.jsonl" "$last" <<'EOF'
import math, sys
path, last = sys.argv[1], int(sys.argv[2])
with open(path, "a") as f:
    for i in range(1, 200001):
        s = last + i
        loss = 1000.0 if i == 123457 else 2 + math.sin(i / 5000.0)
        f.write('{"step":%d,"timestamp":%.6f,"loss":%r,"loss_components":{"kd":null,"ce":%r,"intermediate":null},'
                '"learning_rate":0.0003,"samples_processed":%d,"tokens_processed":%d,'
                '"throughput_samples_per_sec":512.5,"throughput_tokens_per_sec":65574.4}\n'
                % (s, 1.9e9 + i, loss, loss, 4 * s, 128 * s))
EOF
KDKIT_PROGRESS_EVERY=0.001 "$K" report "$B" -o "$W/big.html" 2>"$W/big.err" </dev/null || fail "report of the long log"
grep -q '^kdkit report: reading .*%.*metrics.jsonl' "$W/big.err" || fail "no progress line: $(head -3 "$W/big.err")"
size=$(wc -c <"$W/big.html")
echo "report_e2e: 200k-line metrics log -> $size byte page"
[ "$size" -lt 2000000 ] || fail "the page of a 200k-line log is $size bytes (limit 2 MB)"
grep -o '<path class="series" data-series="loss"[^>]*' "$W/big.html" | grep -q 'data-ymax="1000"' ||
  fail "the one-step spike was lost in downsampling"
echo "report_e2e: ok"
