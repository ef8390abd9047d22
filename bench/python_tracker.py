#!/usr/bin/python3
"""update_metrics from Python through the kdkit binding (python/kdkit),
beside the pure-Python guide-style tracker of bench/tracker_peer.py in the
same run: per-call p50/p99 and the ratio.  Both get the guide's keyword
arguments; kdkit's call buffers the line (flushed every second, at
checkpoints and at close), the peer json.dumps + writes one line per call.

usage: bench/python_tracker.py [CALLS=200000]   (KDKIT_LIBRARY picks the .so)
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(here), "python"))
import kdkit  # noqa: E402


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
    d = tempfile.mkdtemp(prefix="kdkit-bench-py-")
    lat = []
    try:
        t = kdkit.ProgressTracker(output_dir=os.path.join(d, "tp"), config={"bench": 1},
                                  total_steps=n)
        clock = time.perf_counter_ns
        for step in range(1, n + 1):
            t0 = clock()
            loss = 2.5 + 1.0 / step
            t.update_metrics(step=step, loss=loss,
                             loss_components={"kd": loss * 0.6, "ce": loss * 0.4,
                                              "intermediate": 0.01},
                             learning_rate=3e-4, samples_processed=step * 32,
                             tokens_processed=step * 32 * 128,
                             throughput_samples_per_sec=512.0,
                             throughput_tokens_per_sec=65536.0)
            lat.append(clock() - t0)
        t.close()
        lines = sum(1 for _ in open(os.path.join(d, "tp", "metrics.jsonl")))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    print(f"kdkit binding update_metrics ({n} calls, {lines} lines): p50 {p50} ns  "
          f"p99 {p99} ns  mean {sum(lat) / len(lat):.0f} ns  ({kdkit.library_path})")
    peer = subprocess.run([sys.executable, os.path.join(here, "tracker_peer.py"), str(n)],
                          check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    print(peer)
    m = re.search(r"p50 (\d+) ns\s+p99 (\d+) ns", peer)
    if m:
        q50, q99 = int(m.group(1)), int(m.group(2))
        print(f"ratio peer/kdkit: p50 {q50 / p50:.2f}x  p99 {q99 / p99:.2f}x  "
              f"(> 1: the binding is faster)")


if __name__ == "__main__":
    main()
