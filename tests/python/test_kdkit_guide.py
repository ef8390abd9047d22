"""The guide's Python snippets run against kdkit (tests/python/guide_snippets.py).

Each snippet runs unchanged (apart from the import) in one namespace, in the
guide's order, in a scratch directory, so "training_progress" is created
there.  The free variables are set the way a trainer would have them: a
torch model, numpy numbers in the config, a teacher client.  `time.sleep` in
the namespace records the delays instead of waiting (the snippets' backoff
would take 15 s); everything else is real.  After the snippets the
directory must pass `kdkit verify` and `kdkit status` must show the run.

Deviation, the one the library forces: Pause/Resume reopens the directory
with the guide's literal example id "training_20251116_120000_abc12345"; a
session of that id does not exist, and kdkit refuses it (NotFoundError, with
the library's message, asserted here).  The snippet then runs with the
session's real id, and its second half ("When resuming", which in the guide
is a new process) runs after the first tracker is closed: one tracker per
directory (LockedError otherwise, asserted too).
"""
import contextlib
import hashlib
import io
import json
import os
import time as real_time
import types
import unittest
from pathlib import Path

import numpy as np
import torch

import kdtest
import kdkit
from guide_snippets import SNIPPETS

GUIDE_ID = "training_20251116_120000_abc12345"


class FakeTime(types.SimpleNamespace):
    """time as the snippets use it: real clock, recorded sleeps."""

    def __init__(self):
        super().__init__(sleeps=[])

    def time(self):
        return real_time.time()

    def sleep(self, s):
        self.sleeps.append(s)


class FlakyClient:
    """api_client / teacher_model: fails with ConnectionError on the calls
    listed in `fail`, else answers through kdkit's Teacher."""

    def __init__(self, teacher, fail=()):
        self.teacher = teacher
        self.fail = set(fail)
        self.calls = 0

    def _answer(self, prompt):
        self.calls += 1
        if self.calls in self.fail:
            raise ConnectionError("connection reset by peer (call %d)" % self.calls)
        return self.teacher.generate(prompt)

    call = _answer
    generate = _answer


def lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


class GuideSnippets(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = kdtest.workdir("guide")
        cls.server = kdtest.ToyServer(cls.dir)
        cls.old_cwd = os.getcwd()
        os.chdir(cls.dir)

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls.old_cwd)
        cls.server.stop()

    def run_snippet(self, name, ns):
        code = compile(SNIPPETS[name], "<guide: %s>" % name, "exec")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, ns)
        return out.getvalue()

    def test_guide_in_order(self):
        tp = os.path.join(self.dir, "training_progress")
        cache_path = os.path.join(self.dir, "teacher_cache.sqlite")
        cfg = kdtest.teacher_config(self.server.base_url, cache_path)
        torch.manual_seed(0)
        ns = {
            "Path": Path, "hashlib": hashlib, "torch": torch, "time": FakeTime(),
            "training_config": {"lr": np.float32(3e-4), "batch_size": np.int64(8),
                                "layers": [np.int32(2), 4], "name": "tiny",
                                "betas": (0.9, 0.95)},
        }
        # Initialization
        self.run_snippet("initialization", ns)
        tracker = ns["tracker"]
        self.assertIsInstance(tracker, kdkit.ProgressTracker)
        self.assertTrue(os.path.exists(os.path.join(tp, "session.json")))
        first_id = tracker.session_id

        # Recording Metrics: 20 steps of batch 8 x 32 tokens
        ns.update(dataloader=[None] * 20, loss_value=2.5, kd_loss=np.float32(1.0),
                  ce_loss=torch.tensor(1.25), intermediate_loss=0.25, current_lr=3e-4,
                  batch_size=8, seq_len=32, current_throughput_samples=100.0,
                  current_throughput_tokens=3200.0)
        self.run_snippet("recording_metrics", ns)

        # Recording Checkpoints (the file must be inside the output directory)
        model = torch.nn.Linear(4, 2)
        ns.update(model=model, checkpoint_path=os.path.join(tp, "checkpoint_19.pt"),
                  current_sample_index=160, is_best=True)
        self.run_snippet("recording_checkpoints", ns)
        rc = tracker.get_recovery_checkpoint()
        self.assertEqual((rc.step, rc.dataset_position), (19, 160))
        self.assertEqual(rc.hash, hashlib.sha256(Path(rc.checkpoint_path).read_bytes())
                         .hexdigest())
        manifest = json.loads(Path(tp, "checkpoints.json").read_text())
        self.assertIn("best_loss", json.dumps(manifest))

        # API Response Recovery: the second generate fails once
        teacher = kdkit.Teacher(cfg, tracker)
        ns.update(teacher_model=FlakyClient(teacher, fail={2}),
                  prompt="What is distillation?", estimated_api_cost=0.001, attempt=0)
        self.run_snippet("api_response_recovery", ns)
        self.assertEqual(ns["time"].sleeps, [1])
        fails = lines(os.path.join(tp, "failures.jsonl"))
        self.assertEqual(len(fails), 1)
        self.assertIn("connection reset by peer", json.dumps(fails[0]))
        ledger = lines(os.path.join(tp, "api_recovery.jsonl"))
        # one line from kdkit's paid path (Teacher), one from the snippet
        mine = [x for x in ledger if x.get("prompt_hash") == hashlib.sha256(
            b"What is distillation?").hexdigest()]
        self.assertEqual(len(mine), 2)
        self.assertEqual(mine[-1]["response"], ns["response"])

        # Scenario 1: fails twice, then answers
        ns["time"].sleeps.clear()
        ns.update(api_client=FlakyClient(teacher, fail={1, 2}), prompt="Name a prime.",
                  prompt_hash=hashlib.sha256(b"Name a prime.").hexdigest(), cost=0.002,
                  teacher_cache=kdkit.TeacherCache(cfg))
        self.run_snippet("scenario_1", ns)
        self.assertEqual(ns["time"].sleeps, [1, 2])
        self.assertEqual(ns["response"], teacher.generate("Name a prime."))
        self.assertEqual(len(lines(os.path.join(tp, "failures.jsonl"))), 3)

        # Scenario 1: every attempt fails; the answer kdkit's Teacher cached
        # for this prompt is the fallback (same key from Python and C)
        ns["time"].sleeps.clear()
        ns.update(api_client=FlakyClient(teacher, fail={1, 2, 3, 4, 5}),
                  prompt="What is distillation?", response=None)
        self.run_snippet("scenario_1", ns)
        self.assertEqual(ns["time"].sleeps, [1, 2, 4, 8])
        self.assertEqual(ns["response"], teacher.generate("What is distillation?"))
        self.assertIsNotNone(ns["response"])

        # ... and with nothing cached, the error propagates
        ns.update(api_client=FlakyClient(teacher, fail={1, 2, 3, 4, 5}),
                  prompt="never asked before")
        with self.assertRaises(ConnectionError):
            self.run_snippet("scenario_1", ns)

        # Always check cache first: a miss calls the client and puts the answer
        ns.update(api_client=FlakyClient(teacher), prompt="Cache me.",
                  prompt_hash=hashlib.sha256(b"Cache me.").hexdigest())
        self.assertIsNone(ns["teacher_cache"].get("Cache me."))
        self.run_snippet("check_cache_first", ns)
        self.assertEqual(ns["teacher_cache"].get("Cache me."), ns["response"])
        calls = ns["api_client"].calls
        self.run_snippet("check_cache_first", ns)  # now a hit: no call
        self.assertEqual(ns["api_client"].calls, calls)
        teacher.close()

        # Monitoring Progress
        out = self.run_snippet("monitoring_progress", ns)
        self.assertIn("Session: %s" % first_id, out)
        self.assertIn("Steps: 19/10000", out)
        self.assertIn("Progress: 0.2%", out)
        self.assertRegex(out, r"Loss Trend: (plateau|improving|diverging|insufficient_data)")

        # Pause/Resume with the guide's literal id: no such session
        with self.assertRaises(kdkit.LockedError):
            kdkit.ProgressTracker(output_dir=Path("training_progress"),
                                  config=ns["training_config"], total_steps=10000)
        pause, resume = SNIPPETS["pause_resume"].split("# When resuming")
        exec(compile(pause, "<guide: pause>", "exec"), ns)
        tracker.close()  # the process ends here in the guide's story
        with self.assertRaises(kdkit.NotFoundError) as cm:
            exec(compile("# When resuming" + resume, "<guide: resume>", "exec"), ns)
        self.assertIn("session %s not found" % GUIDE_ID, str(cm.exception))
        exec(compile(("# When resuming" + resume).replace(GUIDE_ID, first_id),
                     "<guide: resume>", "exec"), ns)
        self.assertIsNot(ns["tracker"], tracker)
        self.assertTrue(ns["tracker"].resumed)
        self.assertEqual(ns["checkpoint_path"], rc.checkpoint_path)
        self.assertEqual(ns["dataset_position"], 160)
        summary = ns["tracker"].get_progress_summary()
        self.assertEqual(summary["steps_completed"], 19)
        self.assertGreaterEqual(summary["pauses"], 1)  # the pause (and the gap until reopen)
        self.assertEqual(summary["connection_failures"], 1 + 2 + 5 + 5)
        ns["tracker"].close()

        self.assertIn("healthy", kdtest.run_kdkit("verify", tp).stdout)
        status = kdtest.run_kdkit("status", tp).stdout
        self.assertIn(first_id, status)
        self.assertIn("19/10000", status)


if __name__ == "__main__":
    unittest.main()
