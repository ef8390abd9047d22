#!/usr/bin/python3
"""tests/checkpoint_doc.py - the Python snippet of docs/checkpoint-format.md
("Interop") run as written on a checkpoint `kdkit train` has just made.

    checkpoint_doc.py KDKIT SOURCE_DIR WORKDIR

Trains configs/tiny-test.yaml for 2 steps on a small corpus, takes the
```python block of the Interop section, points it at the checkpoint, runs
it, and checks that the names it uses are the file's (wte [256, d_model],
opt.m.wte of the same shape) and that the values it reads are the tensor's
bytes.  Debian's /usr/bin/python3 with numpy (as tests/ckpt_interop.py).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import numpy as np  # a missing numpy is a failure, not a skip

kdkit, src, work = sys.argv[1], sys.argv[2], sys.argv[3]
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
corpus = os.path.join(work, "corpus.txt")
with open(corpus, "w") as f:
    for i in range(80):
        f.write(f"{i}. A teacher answers; the student listens, and learns a little more.\n")
run = os.path.join(work, "run")
subprocess.run([kdkit, "train", "--config", os.path.join(src, "configs/tiny-test.yaml"),
                "--output-dir", run, "--set", "train.steps=2", "--set", "lr.warmup_steps=1",
                "--set", "checkpoint.every=2", "--set", "eval.every=0",
                "--set", f"data.path={corpus}"], check=True, stdout=subprocess.DEVNULL)
ckpts = glob.glob(os.path.join(run, "checkpoint_*.safetensors"))
assert len(ckpts) == 1, ckpts

doc = open(os.path.join(src, "docs/checkpoint-format.md")).read()
interop = doc[doc.index("## Interop"):]
m = re.search(r"```python\n(.*?)```", interop, re.S)
assert m, "docs/checkpoint-format.md has no python snippet under Interop"
snippet = m.group(1)
assert "checkpoint_1000.safetensors" in snippet
ns = {}
exec(snippet.replace("checkpoint_1000.safetensors", ckpts[0]), ns)  # KeyError if names are wrong

wte, m_wte, header = ns["wte"], ns["m_wte"], ns["header"]
d_model = 32  # configs/tiny-test.yaml
assert wte.shape == (256, d_model), wte.shape
assert m_wte.shape == wte.shape
assert "opt.v.wte" in header and "opt.step" in header
assert not any(k.startswith(("model.", "optim.")) for k in header), sorted(header)[:5]
assert np.isfinite(wte).all() and float(np.abs(wte).sum()) > 0
print("1 passed, 0 failed: the documented snippet reads wte", wte.shape, "and opt.m.wte")
