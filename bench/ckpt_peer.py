#!/usr/bin/python3
"""bench/ckpt_peer.py - the PyTorch peer of bench/bench_ckpt.c.

    ckpt_peer.py DIR [REPS]

Loads the tensors of DIR/bench_ckpt.safetensors (written by bench_ckpt) with
numpy into torch tensors - the same tensors kdkit wrote - and times:
  torch.save to DIR/bench_peer.pt, then flush and os.fsync (so the figure
  includes getting the bytes to disk, as kdkit's does; torch.save itself
  neither fsyncs nor replaces atomically);
  torch.load of that file, hot (in the page cache) and cold (dropped with
  POSIX_FADV_DONTNEED first).
Best of REPS (default 3), MB/s of tensor bytes (1 MB = 10^6 bytes), one
"name value" line each.  Debian's /usr/bin/python3 with python3-torch.
"""
import json
import os
import struct
import sys
import time

import numpy as np
import torch


def load_same_tensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, t in header.items():
        assert t["dtype"] == "F32"
        b, e = t["data_offsets"]
        a = np.frombuffer(blob, dtype="<f4", count=(e - b) // 4, offset=base + b)
        out[name] = torch.from_numpy(a.reshape(t["shape"]).copy())
    return out


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main():
    d = sys.argv[1]
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    tensors = load_same_tensors(os.path.join(d, "bench_ckpt.safetensors"))
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    path = os.path.join(d, "bench_peer.pt")
    best_save = best_hot = best_cold = float("inf")
    for _ in range(reps):
        if os.path.exists(path):
            os.unlink(path)
        os.sync()
        t0 = time.monotonic()
        with open(path, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        best_save = min(best_save, time.monotonic() - t0)
    for r in range(2 * reps):
        cold = r % 2 == 1
        if cold:
            drop_cache(path)
        t0 = time.monotonic()
        loaded = torch.load(path)
        dt = time.monotonic() - t0
        del loaded
        if cold:
            best_cold = min(best_cold, dt)
        else:
            best_hot = min(best_hot, dt)
    mb = nbytes / 1e6
    print(f"torch {torch.__version__}")
    print(f"torch_file_MB {os.path.getsize(path) / 1e6:.1f}")
    print(f"torch_save_fsync_MBps {mb / best_save:.0f}")
    print(f"torch_load_hot_MBps {mb / best_hot:.0f}")
    print(f"torch_load_cold_MBps {mb / best_cold:.0f}")
    os.unlink(path)


if __name__ == "__main__":
    main()
