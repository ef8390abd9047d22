#!/bin/sh
# scripts/kd_pipeline.sh - the main job (`make run`): the whole distillation
# pipeline on built-in defaults, no network beyond loopback, into kd_run/:
#
#   1. teacher   kdkit train pretrains a 4-layer GPT on the fortunes corpus
#                (kd_run/teacher; reused once complete)
#   2. prompts   the first words of fortunes, one per line (kd_run/prompts.txt)
#   3. serve     kdkit serve --model <teacher checkpoint> on 127.0.0.1
#   4. mix       kdkit mix asks the served teacher every prompt once, keeping
#                its top-20 log-probs (kd_run/mix; made-up prices so the cost
#                shows; a rerun pays nothing)
#   5. student   kdkit train distils a 2-layer GPT from the mix (kd_run/student)
#   6. report    kdkit status, kdkit eval on the held-out split
#
# Run it again: every stage resumes or is reused, and nothing is paid twice.
# Usage: scripts/kd_pipeline.sh [BUILD_DIR] [RUN_DIR]
set -eu
B=${1:-build}/kdkit
R=${2:-kd_run}
CORPUS=/usr/share/games/fortunes
mkdir -p "$R"

say() { printf '\n== %s\n' "$*"; }
resume_flag() { if [ -e "$1/session.json" ]; then echo "--resume auto"; fi; }

say "1/6 teacher: a 4-layer GPT pretrained on $CORPUS ($R/teacher)"
echo "+ $B train --config configs/pipeline-teacher.yaml --output-dir $R/teacher $(resume_flag "$R/teacher")"
# shellcheck disable=SC2046
"$B" train --config configs/pipeline-teacher.yaml --output-dir "$R/teacher" $(resume_flag "$R/teacher")
TCK=$(ls "$R"/teacher/checkpoint_*.safetensors | sed 's/.*checkpoint_\([0-9]*\)\.safetensors/\1 &/' | sort -n | tail -1 | cut -d' ' -f2)

say "2/6 prompts: the first words of up to 500 fortunes ($R/prompts.txt)"
if [ ! -s "$R/prompts.txt" ]; then
    awk 'BEGIN{n=0; want=1}
         /^%$/ {want=1; next}
         want && length($0) > 8 { s=substr($0, 1, 24); sub(/[ \t]+$/, "", s); print s; n++; want=0 }
         n >= 500 {exit}' $(find "$CORPUS" -maxdepth 1 -type f ! -name '*.dat' ! -name '.*' | sort) \
        > "$R/prompts.tmp"
    mv "$R/prompts.tmp" "$R/prompts.txt"
    echo "wrote $(wc -l < "$R/prompts.txt") prompts"
else
    echo "reusing $R/prompts.txt ($(wc -l < "$R/prompts.txt") prompts)"
fi

say "3/6 serve: kdkit serve --model $TCK on 127.0.0.1"
rm -f "$R/serve.port"
"$B" serve --model "$TCK" --port 0 --port-file "$R/serve.port" > "$R/serve.log" 2>&1 &
SPID=$!
trap 'kill $SPID 2>/dev/null || true' EXIT INT TERM
i=0
while [ ! -s "$R/serve.port" ]; do
    i=$((i + 1))
    if [ $i -gt 200 ] || ! kill -0 $SPID 2>/dev/null; then
        echo "kdkit serve did not come up:"; cat "$R/serve.log"; exit 1
    fi
    sleep 0.05
done
PORT=$(cat "$R/serve.port")
echo "teacher listening on http://127.0.0.1:$PORT/v1 (log: $R/serve.log)"

say "4/6 mix: every prompt asked once, top-20 log-probs kept ($R/mix)"
echo "+ $B mix --config configs/pipeline-mix.yaml --prompts $R/prompts.txt --output-dir $R/mix"
set +e
"$B" mix --config configs/pipeline-mix.yaml --prompts "$R/prompts.txt" --output-dir "$R/mix" \
    --set "teacher.base_url=http://127.0.0.1:$PORT/v1"
mrc=$?
set -e
if [ $mrc -ne 0 ]; then echo "kdkit mix exited $mrc: the mix is not complete; run make run again"; exit $mrc; fi
kill $SPID 2>/dev/null || true
wait $SPID 2>/dev/null || true
trap - EXIT INT TERM

say "5/6 student: a 2-layer GPT distilled from the mix ($R/student)"
echo "+ $B train --config configs/pipeline-student.yaml --set kd.mix=$R/mix --output-dir $R/student $(resume_flag "$R/student")"
# shellcheck disable=SC2046
"$B" train --config configs/pipeline-student.yaml --set "kd.mix=$R/mix" --output-dir "$R/student" $(resume_flag "$R/student")
SCK=$(ls "$R"/student/checkpoint_*.safetensors | sed 's/.*checkpoint_\([0-9]*\)\.safetensors/\1 &/' | sort -n | tail -1 | cut -d' ' -f2)

say "6/6 report"
echo "+ $B status $R/mix"
"$B" status "$R/mix" || true
echo "+ $B status $R/student"
"$B" status "$R/student"
echo "+ $B eval --checkpoint $SCK --mix $R/mix"
"$B" eval --checkpoint "$SCK" --mix "$R/mix"
echo
echo "The student's bits/byte on held-out teacher text, next to the teacher's own;"
echo "everything is in $R/. Run 'make run' again: every stage resumes or is reused,"
echo "and the mix pays for nothing it already has."
