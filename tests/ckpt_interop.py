#!/usr/bin/python3
"""tests/ckpt_interop.py - kdkit checkpoints and numpy, both ways.

Run by ctest (tests/ckpt.cmake) with Debian's /usr/bin/python3 and numpy only:

    ckpt_interop.py HELPER WORKDIR

HELPER is the test_ckpt_interop binary (tests/test_ckpt_interop.c).  The
script
  1. has HELPER write a checkpoint with kdkit, reads it with the small
     numpy-only safetensors reader below, and compares every value, the
     metadata, the size and the SHA-256 HELPER reported;
  2. writes a checkpoint with the independent writer below (tensors in
     another order, data in yet another order, no header padding, so the
     tensors are unaligned) and has HELPER read and check it with kdkit;
  3. damages copies of that file and checks that kdkit rejects them.

Value rule (same as the C side): a tensor's metadata "seed:<name>" = s;
element i is b = (7 i + s) mod 251, stored as b for U8, b - 100 for I32/I64,
(b - 100) / 4 for the float types.  numpy has no bfloat16: BF16 is the high
half of the float32 bit pattern.
"""
import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np  # a missing numpy is a failure, not a skip

DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"),
          "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "U8": np.dtype("u1"),
          "BF16": np.dtype("<u2")}
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)


def expected(n, seed, dtype):
    b = (np.arange(n, dtype=np.int64) * 7 + seed) % 251
    if dtype == "U8":
        return b.astype(np.float64)
    if dtype in ("I32", "I64"):
        return (b - 100).astype(np.float64)
    return (b - 100) / 4.0


def encode(values, dtype):
    if dtype == "BF16":
        return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return values.astype(DTYPES[dtype]).tobytes()


def decode(raw, dtype, shape):
    a = np.frombuffer(raw, dtype=DTYPES[dtype])
    if dtype == "BF16":
        a = (a.astype("<u4") << 16).view("<f4")
    return a.reshape(shape)


def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


def read_safetensors(path):
    """A minimal reader: numpy arrays by name, and the metadata."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n].decode("utf-8"), object_pairs_hook=no_duplicates)
    data = blob[8 + n:]
    meta = header.pop("__metadata__", {})
    arrays, spans = {}, []
    for name, t in header.items():
        b, e = t["data_offsets"]
        spans.append((b, e))
        arrays[name] = decode(data[b:e], t["dtype"], t["shape"])
        check(e - b == DTYPES[t["dtype"]].itemsize * int(np.prod(t["shape"], dtype=np.int64)),
              f"{name}: span matches shape")
    spans.sort()
    pos = 0
    for b, e in spans:
        check(b == pos, f"contiguous data at {b}")
        pos = e
    check(pos == len(data), "data ends at end of file")
    return blob, n, list(header.keys()), header, arrays, meta


def kdkit_to_numpy(helper, work):
    path = os.path.join(work, "kdkit.safetensors")
    out = subprocess.run([helper, "write", path], capture_output=True, text=True)
    check(out.returncode == 0, f"helper write: {out.stderr.strip()}")
    size, sha = out.stdout.split()
    blob, n, names, header, arrays, meta = read_safetensors(path)
    check(int(size) == len(blob), "size reported by kdkit = file size")
    check(sha == hashlib.sha256(blob).hexdigest(), "SHA-256 reported by kdkit = hashlib's")
    check((8 + n) % 8 == 0, "kdkit pads the header to a multiple of 8")
    check(names == sorted(names, key=lambda s: s.encode()), "kdkit lists tensors by name")
    for name, t in header.items():
        b = t["data_offsets"][0]
        check((8 + n + b) % DTYPES[t["dtype"]].itemsize == 0, f"{name} is aligned")
    check(meta.get("kdkit_format") == "1", "kdkit_format is 1")
    check(meta.get("step") == "4242" and meta.get("dataset_position") == "777", "step, position")
    check(meta.get("unicode") == "h\u00e9llo \u2713", "UTF-8 metadata")
    for key in ("rng_state", "lr_schedule", "session_id", "config_hash", "loss", "created_at"):
        check(key in meta, f"metadata has {key}")
    check(float(meta.get("loss", "nan")) == 1.5, "loss")
    check(len(arrays) == 9, "nine tensors")
    for name, a in arrays.items():
        dtype = header[name]["dtype"]
        want = expected(a.size, int(meta["seed:" + name]), dtype).reshape(a.shape)
        check(np.array_equal(a.astype(np.float64), want), f"values of {name} ({dtype})")
    check(arrays["scalar"].shape == () and arrays["empty"].shape == (0, 5), "scalar and empty")
    print(f"kdkit -> numpy: {len(arrays)} tensors, {len(blob)} bytes checked")


def write_independent(path, tensors, meta, pad=False):
    """An independent writer: header in the given order, data in reverse."""
    header, chunks, off = {}, [], 0
    for name, dtype, shape, seed in reversed(tensors):
        n = int(np.prod(shape, dtype=np.int64))
        raw = encode(expected(n, seed, dtype), dtype)
        chunks.append(raw)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    ordered = {"__metadata__": meta}
    for name, _, _, _ in tensors:
        ordered[name] = header[name]
    text = json.dumps(ordered, ensure_ascii=False).encode("utf-8")
    if pad:
        text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))
    return len(text)


def numpy_to_kdkit(helper, work):
    tensors = [("zeta.u8", "U8", (3,), 21), ("alpha.f32", "F32", (2, 3), 22),
               ("m.f16", "F16", (5,), 23), ("m.bf16", "BF16", (2, 2, 2), 24),
               ("v.f64", "F64", (3,), 25), ("step.i64", "I64", (), 26),
               ("ids.i32", "I32", (7,), 27), ("nothing", "F64", (0,), 28),
               ("caf\u00e9/\u2713", "F32", (1,), 29)]
    meta = {"format": "np", "caf\u00e9": "\u2713"}
    meta.update({"seed:" + name: str(seed) for name, _, _, seed in tensors})
    path = os.path.join(work, "numpy.safetensors")
    hl = write_independent(path, tensors, meta)
    check(hl % 8 != 0, "the independent file is unpadded (unaligned tensors)")
    out = subprocess.run([helper, "read", path], capture_output=True, text=True)
    check(out.returncode == 0, f"kdkit reads the numpy-written file: {out.stdout.strip()}")
    print("numpy -> kdkit:", out.stdout.strip())

    blob = open(path, "rb").read()
    hostile = {
        "truncated": (blob[:-1], "data must end at end of file"),
        "extra_byte": (blob + b"\0", "data must end at end of file"),
        "header_too_long": (struct.pack("<Q", len(blob)) + blob[8:], "exceeds the file"),
        "duplicate": (None, "duplicate key"),
    }
    text = blob[8:8 + hl].decode("utf-8")
    dup = text.replace('"__metadata__": {', '"__metadata__": {"format": "x", ', 1).encode()
    hostile["duplicate"] = (struct.pack("<Q", len(dup)) + dup + blob[8 + hl:], "duplicate key")
    for name, (raw, rule) in hostile.items():
        p = os.path.join(work, f"hostile_{name}.safetensors")
        with open(p, "wb") as f:
            f.write(raw)
        out = subprocess.run([helper, "read", p], capture_output=True, text=True)
        check(out.returncode == 3 and rule in out.stdout,
              f"kdkit rejects {name} with '{rule}': got {out.returncode} {out.stdout.strip()}")
    print(f"kdkit rejects {len(hostile)} damaged copies")


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    helper, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    print("numpy", np.__version__)
    kdkit_to_numpy(helper, work)
    numpy_to_kdkit(helper, work)
    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    print("interop: all checks pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
