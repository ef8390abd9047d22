#!/bin/sh
# Run every benchmark (bench/run_*.sh) against a Release build, then print one
# table of every figure against its target.
#   bench/run.sh [BUILD_DIR]
#
# Each run_*.sh prints its figures (ours beside a peer's, measured in the
# same run) and, for each figure that has a target, one line
#   target: <what> | <figure, with the peer> | <target> | met|NOT met
# which this script collects into the closing table.  A benchmark that
# fails shows up in the table as failed; the others still run.
set -eu
build=${1:-build}
here=$(dirname "$0")
work=$(mktemp -d /tmp/kdkit-bench-run.XXXXXX)
trap 'rm -rf "$work"' EXIT
: >"$work/all"

load() { cut -d' ' -f1-3 /proc/loadavg; }
echo "== kdkit benchmarks: $(nproc) CPUs, load average $(load) at the start$( \
  [ "$(awk '{ print ($1 >= 1) }' /proc/loadavg)" = 1 ] && echo ' (a busy machine: figures are noisy)')"
for s in "$here"/run_*.sh; do
  name=$(basename "$s" .sh)
  echo "== $name"
  # stream the output and keep it; the exit status goes through a file
  # because a pipeline reports only its last command's
  { st=0; sh "$s" "$build" 2>&1 || st=$?; echo "$st" >"$work/rc"; } | tee "$work/out"
  cat "$work/out" >>"$work/all"
  rc=$(cat "$work/rc")
  if [ "$rc" != 0 ]; then
    echo "target: $name | failed (exit $rc) | - | NOT met" >>"$work/all"
  fi
done

echo
echo "== targets ($(nproc) CPUs, load average $(load) at the end)"
awk -F' [|] ' '
  BEGIN { w1 = length("figure"); w2 = length("measured (peer)"); w3 = length("target") }
  /^target: / {
    sub(/^target: /, "", $1)
    n++; what[n] = $1; fig[n] = $2; tgt[n] = $3; ok[n] = $4
    if (length($1) > w1) w1 = length($1)
    if (length($2) > w2) w2 = length($2)
    if (length($3) > w3) w3 = length($3)
  }
  END {
    if (n == 0) { print "(no targets reported)"; exit }
    fmt = "%-" w1 "s  %-" w2 "s  %-" w3 "s  %s\n"
    printf fmt, "figure", "measured (peer)", "target", ""
    for (i = 1; i <= n; i++) { printf fmt, what[i], fig[i], tgt[i], ok[i]; if (ok[i] != "met") miss++ }
    printf "%d of %d targets met\n", n - miss, n
  }' "$work/all"
