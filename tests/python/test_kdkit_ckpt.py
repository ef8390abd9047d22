"""kdkit.load_checkpoint / save_checkpoint: the strict loader and the atomic
writer from Python, zero-copy numpy views, torch tensors, hostile files, and
a checkpoint of `kdkit train` giving the same logits in torch as in C.
"""
import json
import math
import os
import struct
import subprocess
import unittest

import numpy as np
import torch
import torch.nn.functional as F

import kdtest
import kdkit


def header_of(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def write_raw(path, header, data):
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def gpt_forward(P, cfg, tokens):
    """The student GPT of docs/model.md in torch, from the checkpoint's
    tensors: pre-LayerNorm blocks, causal attention, tanh GELU, tied output."""
    L, H, C = cfg["n_layer"], cfg["n_head"], cfg["d_model"]
    B, T = tokens.shape
    hs = C // H
    x = P["wte"][tokens] + P["wpe"][:T]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(L):
        def p(n):
            return P["h.%d.%s" % (i, n)]
        h = F.layer_norm(x, (C,), p("ln_1.weight"), p("ln_1.bias"), 1e-5)
        q, k, v = F.linear(h, p("attn.c_attn.weight"), p("attn.c_attn.bias")).split(C, dim=2)
        q, k, v = (t.view(B, T, H, hs).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + F.linear(y, p("attn.c_proj.weight"), p("attn.c_proj.bias"))
        h = F.layer_norm(x, (C,), p("ln_2.weight"), p("ln_2.bias"), 1e-5)
        h = F.gelu(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias")), approximate="tanh")
        x = x + F.linear(h, p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))
    x = F.layer_norm(x, (C,), P["ln_f.weight"], P["ln_f.bias"], 1e-5)
    return x @ P["wte"].T


class Checkpoints(unittest.TestCase):
    def setUp(self):
        self.dir = kdtest.workdir("ckpt_" + self._testMethodName)

    def test_roundtrip_every_dtype_zero_copy(self):
        rng = np.random.default_rng(1)
        t = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
             "f64": rng.standard_normal(7),
             "f16": rng.standard_normal((2, 2)).astype(np.float16),
             "i64": np.arange(-3, 9, dtype=np.int64).reshape(3, 4),
             "i32": np.arange(5, dtype=np.int32),
             "u8": np.frombuffer(b"kdkit", dtype=np.uint8),
             "scalar": np.array(2.5, dtype=np.float32),
             "empty": np.zeros((0, 4), dtype=np.float32),
             "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]}
        path = os.path.join(self.dir, "a.safetensors")
        w = kdkit.save_checkpoint(path, t, {"step": "12", "note": "héllo"})
        self.assertEqual(w["size"], os.path.getsize(path))
        import hashlib
        with open(path, "rb") as f:
            self.assertEqual(w["sha256"], hashlib.sha256(f.read()).hexdigest())
        got, meta = kdkit.load_checkpoint(path, expect_size=w["size"],
                                          expect_sha256=w["sha256"])
        # the writer adds the data section's XXH3-128 (docs/checkpoint-format.md)
        self.assertRegex(meta.pop("data_xxh3_128"), r"^[0-9a-f]{32}$")
        self.assertEqual(meta, {"step": "12", "note": "héllo"})
        self.assertEqual(sorted(got), sorted(t))
        for k, v in t.items():
            np.testing.assert_array_equal(got[k], v)
            self.assertEqual(got[k].dtype, v.dtype)
            self.assertFalse(got[k].flags.writeable)
        # zero copy: the arrays sit in one mapping at the header's offsets
        n, hdr = header_of(path)
        a, b = got["f32"], got["i64"]
        addr = lambda x: x.__array_interface__["data"][0]  # noqa: E731
        self.assertEqual(addr(a) - addr(b),
                         hdr["f32"]["data_offsets"][0] - hdr["i64"]["data_offsets"][0])
        with self.assertRaises(ValueError):
            a[0, 0] = 1.0  # read-only mapping: refused, not a crash
        # the mapping outlives the dict as long as an array is alive
        keep = got["f64"]
        del got, a, b
        np.testing.assert_array_equal(keep, t["f64"])

    def test_torch_tensors_and_bf16(self):
        t = {"w": torch.randn(4, 3), "bf": torch.randn(6).to(torch.bfloat16),
             "ids": torch.arange(4)}
        path = os.path.join(self.dir, "t.safetensors")
        kdkit.save_checkpoint(path, t)
        got, _ = kdkit.load_checkpoint(path, framework="torch")
        for k in t:
            self.assertEqual(got[k].dtype, t[k].dtype, k)
            self.assertTrue(torch.equal(got[k], t[k]), k)
        got["w"].add_(1.0)  # copies by default: writable
        shared, _ = kdkit.load_checkpoint(path, framework="torch", copy=False)
        self.assertTrue(torch.equal(shared["w"], t["w"]))

    def test_writer_refusals_keep_the_old_file(self):
        path = os.path.join(self.dir, "keep.safetensors")
        kdkit.save_checkpoint(path, {"a": np.ones(2, np.float32)})
        with open(path, "rb") as f:
            before = f.read()
        with self.assertRaises(kdkit.InvalidArgumentError) as cm:
            kdkit.save_checkpoint(path, {"__metadata__": np.ones(1, np.float32)})
        self.assertIn("__metadata__", str(cm.exception))
        with self.assertRaises(TypeError):
            kdkit.save_checkpoint(path, {"c": np.ones(2, np.complex64)})
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(sorted(os.listdir(self.dir)), ["keep.safetensors"])

    def test_hostile_files_raise_the_loaders_message(self):
        good = os.path.join(self.dir, "g.safetensors")
        kdkit.save_checkpoint(good, {"a": np.arange(4, dtype=np.float32),
                                     "b": np.arange(4, dtype=np.float32)})
        cases = {}
        # overlapping tensors
        cases["overlap"] = ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                             "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
                            b"\0" * 24)
        # shape does not match the span
        cases["span"] = ({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}},
                         b"\0" * 16)
        # data past the end of the file
        cases["short"] = ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                          b"\0" * 8)
        # unknown dtype
        cases["dtype"] = ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
                          b"\0" * 8)
        for name, (hdr, data) in cases.items():
            p = os.path.join(self.dir, name + ".safetensors")
            write_raw(p, hdr, data)
            with self.assertRaises(kdkit.KdkitError, msg=name) as cm:
                kdkit.load_checkpoint(p)
            e = cm.exception
            self.assertIn(e.name, ("KD_ECORRUPT", "KD_ELIMIT"), name)
            self.assertIn(p, str(e), name)  # the library names the file
        # a huge header length
        p = os.path.join(self.dir, "huge.safetensors")
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", 1 << 62) + b"{}")
        with self.assertRaises(kdkit.LimitError) as cm:
            kdkit.load_checkpoint(p)
        self.assertIn("header length", str(cm.exception))
        # manifest mismatch
        with self.assertRaises(kdkit.MismatchError):
            kdkit.load_checkpoint(good, expect_sha256="0" * 64)
        with self.assertRaises(kdkit.NotFoundError):
            kdkit.load_checkpoint(os.path.join(self.dir, "missing.safetensors"))

    def test_kdkit_train_checkpoint_same_logits_in_torch(self):
        out = os.path.join(self.dir, "run")
        kdtest.run_kdkit("train", "--config", os.path.join(kdtest.SRC, "configs",
                                                           "tiny-test.yaml"),
                         "--output-dir", out, "--set", "train.steps=10")
        kdtest.run_kdkit("verify", out)
        with open(os.path.join(out, "checkpoints.json")) as f:
            manifest = json.load(f)
        self.assertIn("10", json.dumps(manifest))
        path = os.path.join(out, "checkpoint_10.safetensors")
        tensors, meta = kdkit.load_checkpoint(path, framework="torch")
        self.assertEqual(meta["step"], "10")
        cfg = dict(kv.split("=") for kv in meta["model"].split())
        cfg = {k: int(v) for k, v in cfg.items()}
        text = "The quick brown fox jumps."
        logits_path = os.path.join(self.dir, "logits.bin")
        subprocess.run([os.environ["KD_GPT_LOGITS"], path, text, logits_path],
                       check=True)
        c_logits = np.fromfile(logits_path, dtype="<f4").reshape(len(text), 256)
        tokens = torch.tensor([list(text.encode())], dtype=torch.long)
        with torch.no_grad():
            t_logits = gpt_forward(tensors, cfg, tokens)[0].numpy()
        self.assertGreater(np.abs(c_logits).max(), 1e-3)  # not a zero model
        np.testing.assert_allclose(t_logits, c_logits, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    unittest.main()
