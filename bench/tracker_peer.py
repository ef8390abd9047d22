#!/usr/bin/python3
"""Peer for bench_tracker: a plain Python tracker in the guide's style, whose
update_metrics appends one JSON line per call (json.dumps + write), the way
the guide's training/progress_tracker.py is described.  Prints the per-call
p50/p99 in the same units as bench_tracker."""
import json, os, sys, tempfile, time

def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
    d = tempfile.mkdtemp(prefix="kdkit-bench-peer-")
    path = os.path.join(d, "metrics.jsonl")
    lat = []
    with open(path, "a") as f:
        for step in range(1, n + 1):
            t0 = time.perf_counter_ns()
            loss = 2.5 + 1.0 / step
            rec = {"step": step, "timestamp": time.time(), "loss": loss,
                   "loss_components": {"kd": loss * 0.6, "ce": loss * 0.4, "intermediate": 0.01},
                   "learning_rate": 3e-4, "samples_processed": step * 32,
                   "tokens_processed": step * 32 * 128,
                   "throughput_samples_per_sec": 512.0, "throughput_tokens_per_sec": 65536.0}
            f.write(json.dumps(rec) + "\n")
            lat.append(time.perf_counter_ns() - t0)
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    print(f"python guide-style update_metrics ({n} calls): p50 {p50} ns  p99 {p99} ns  "
          f"mean {sum(lat) / len(lat):.0f} ns")
    os.remove(path)
    os.rmdir(d)

main()
