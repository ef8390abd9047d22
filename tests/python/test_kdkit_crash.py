"""A real PyTorch training loop on kdkit (tests/python/torch_train.py),
SIGKILLed at random moments and started again each time, must end with the
same weights and optimizer state as a run never interrupted; its directory
passes `kdkit verify`, `kdkit status` reads it, and metrics.jsonl holds each
step exactly once (the interrupted attempts' lines moved aside, kept).

The kill moments come from a seeded generator (the seed is printed, and
KD_PY_CRASH_SEED replays a run); each kill lands after the child has made
a random number of steps of progress plus a random delay, so it hits
training, checkpoint writing and recording, not only start-up.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
import unittest

import torch

import kdtest
import kdkit

HERE = os.path.dirname(os.path.abspath(__file__))
TOTAL, EVERY = 80, 7


def start(out):
    return subprocess.Popen([sys.executable, "-B", os.path.join(HERE, "torch_train.py"), out,
                             str(TOTAL), str(EVERY)], stdout=subprocess.PIPE, text=True)


def final_tensors(out):
    t, _ = kdkit.load_checkpoint(os.path.join(out, "checkpoint_%d.safetensors" % TOTAL),
                                 framework="torch")
    return t


class KilledTorchLoop(unittest.TestCase):
    def test_sigkill_and_resume_gives_the_same_weights(self):
        d = kdtest.workdir("crash")
        ref = os.path.join(d, "uninterrupted")
        p = start(ref)
        p.stdout.read()
        p.stdout.close()
        self.assertEqual(p.wait(), 0)

        seed = int(os.environ.get("KD_PY_CRASH_SEED", random.randrange(1 << 30)))
        print("crash seed", seed, file=sys.stderr)
        rnd = random.Random(seed)
        out = os.path.join(d, "killed")
        kills = 0
        for attempt in range(30):
            p = start(out)
            if kills < 3:
                want = rnd.randint(1, 20)  # steps of progress before the kill
                seen = 0
                while seen < want:
                    line = p.stdout.readline()
                    if not line:
                        break
                    seen += 1
                if p.poll() is None:
                    time.sleep(rnd.uniform(0, 0.02))
                    p.send_signal(signal.SIGKILL)
                    kills += 1
            p.stdout.read()
            p.stdout.close()
            rc = p.wait()
            if rc == 0:
                break
            self.assertEqual(rc, -signal.SIGKILL)
        self.assertEqual(rc, 0, "the resumed run did not finish")
        self.assertEqual(kills, 3, "seed %d: too few kills landed" % seed)

        a, b = final_tensors(ref), final_tensors(out)
        self.assertEqual(sorted(a), sorted(b))
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), "seed %d: %s differs" % (seed, k))

        self.assertIn("healthy", kdtest.run_kdkit("verify", out).stdout)
        status = kdtest.run_kdkit("status", out).stdout
        self.assertIn("%d/%d" % (TOTAL, TOTAL), status)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            steps = [json.loads(x)["step"] for x in f if x.strip()]
        self.assertEqual(steps, list(range(1, TOTAL + 1)), "seed %d" % seed)
        with open(os.path.join(out, "session.json")) as f:
            session = json.load(f)
        self.assertEqual(session["steps_completed"], TOTAL)


if __name__ == "__main__":
    unittest.main()
