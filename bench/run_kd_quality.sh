#!/bin/sh
# bench/run_kd_quality.sh - does distillation beat CE-only training?  The same
# student (configs/pipeline-student.yaml), the same steps and data order, on
# the mix `make run` made, trained with the KD defaults (kd 0.5 + ce 0.5,
# forward KL, bucket tail) and CE-only (kd 0, ce 1), 3 seeds each; every
# final checkpoint scored by `kdkit eval` on the mix's held-out split.
# Prints each run, then mean and spread (max - min) per setting, the gap to
# the teacher, and the cost of a KD step against a CE step (wall time of the
# training steps, from metrics.jsonl timestamps).
#
# Usage: bench/run_kd_quality.sh [BUILD_DIR] [MIX_DIR] [STEPS]
set -eu
B=${1:-build}/kdkit
MIX=${2:-kd_run/mix}
STEPS=${3:-300}
OUT=$(mktemp -d /tmp/kd_quality.XXXXXX)
[ -e "$MIX/mix_progress.json" ] || { echo "no mix at $MIX: run make run first (skipped)"; exit 0; }
printf '%-8s %4s %11s %11s %8s %9s %9s %8s\n' setting seed student_bpb teacher_bpb gap agreement kl s/step
for setting in kd ce; do
    for seed in 1 2 3; do
        if [ $setting = kd ]; then w="--set kd.kd_weight=0.5 --set kd.ce_weight=0.5"; else w="--set kd.kd_weight=0 --set kd.ce_weight=1"; fi
        d=$OUT/$setting-$seed
        # shellcheck disable=SC2086
        "$B" train --config configs/pipeline-student.yaml --set "kd.mix=$MIX" --set train.seed=$seed \
            --set train.steps="$STEPS" --set eval.every=0 $w --output-dir "$d" > "$d.log" 2>&1
        ck=$d/checkpoint_$STEPS.safetensors
        "$B" eval --checkpoint "$ck" --mix "$MIX" --json > "$d.eval.json"
        # seconds per step between step 10 and the last (start-up excluded)
        sps=$(jq -s '(.[-1].timestamp - .[9].timestamp) / ((.[-1].step) - .[9].step)' "$d/metrics.jsonl")
        jq -r --arg s $setting --arg seed $seed --arg sps "$sps" \
            '[$s, $seed, .student_bpb, .teacher_bpb, .gap, .first_byte_agreement, .kl_bucket, ($sps|tonumber)] | @tsv' \
            "$d.eval.json" | awk -F'\t' '{printf "%-8s %4s %11.4f %11.4f %8.4f %9.4f %9.4f %8.4f\n", $1,$2,$3,$4,$5,$6,$7,$8}' | tee -a "$OUT/rows.tsv"
    done
done
echo
awk '{n[$1]++; s[$1]+=$3; g[$1]+=$5; a[$1]+=$6; t[$1]+=$8;
      if (!($1 in mn) || $3 < mn[$1]) mn[$1]=$3; if (!($1 in mx) || $3 > mx[$1]) mx[$1]=$3}
     END {for (k in n) printf "%-3s mean student %.4f bits/byte (spread %.4f), gap to teacher %.4f, agreement %.4f, %.4f s/step\n",
                               k, s[k]/n[k], mx[k]-mn[k], g[k]/n[k], a[k]/n[k], t[k]/n[k];
          if (n["kd"] && n["ce"]) {
              printf "KD - CE: %+.4f bits/byte; KD spread %.4f, CE spread %.4f\n", s["kd"]/n["kd"] - s["ce"]/n["ce"], mx["kd"]-mn["kd"], mx["ce"]-mn["ce"];
              printf "KD step / CE step: %.3f\n", (t["kd"]/n["kd"]) / (t["ce"]/n["ce"]) }}' "$OUT/rows.tsv"
echo "runs in $OUT (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
