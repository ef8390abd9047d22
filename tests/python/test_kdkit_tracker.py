"""kdkit.ProgressTracker beyond the guide's snippets: config conversion and
identity, resume by session id, errors as exceptions with the library's
message and code, the closed tracker, the lock, and the files being the ones
`kdkit verify` / `kdkit status` read.
"""
import json
import math
import os
import threading
import unittest
from pathlib import Path

import numpy as np

import kdtest
import kdkit


def jsonl(d, name):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [json.loads(x) for x in f if x.strip()]


class Tracker(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.join(kdtest.workdir("tracker_" + self._testMethodName), "tp")

    def test_library_version_is_the_package_version(self):
        # the libkdkit loaded is the one this package was written for
        self.assertEqual(kdkit.library_version, kdkit.__version__)

    def test_numpy_config_is_the_same_config(self):
        a = {"lr": np.float64(0.25), "n": np.int64(3), "dims": np.array([1, 2]),
             "path": Path("/data"), "nested": {"flag": np.bool_(True)}}
        b = {"lr": 0.25, "n": 3, "dims": [1, 2], "path": "/data", "nested": {"flag": True}}
        with kdkit.ProgressTracker(self.dir, a, 10) as t:
            h, sid = t.config_hash, t.session_id
            self.assertFalse(t.resumed)
        with kdkit.ProgressTracker(Path(self.dir), b, 10) as t:
            self.assertEqual((t.config_hash, t.session_id), (h, sid))
            self.assertTrue(t.resumed)

    def test_bad_config_types(self):
        with self.assertRaises(kdkit.InvalidArgumentError) as cm:
            kdkit.ProgressTracker(self.dir, [1, 2, 3], 10)
        self.assertEqual(cm.exception.name, "KD_EINVAL")
        self.assertEqual(cm.exception.code, -32001)
        self.assertIn("config must be a JSON object", str(cm.exception))
        with self.assertRaises(TypeError) as cm:
            kdkit.ProgressTracker(self.dir, {"s": {1, 2}}, 10)
        self.assertIn("set", str(cm.exception))
        with self.assertRaises(TypeError):
            kdkit.ProgressTracker(self.dir, {"lr": float("nan")}, 10)

    def test_resume_by_session_id_and_config_change(self):
        with kdkit.ProgressTracker(self.dir, {"v": 1}, 100) as t:
            sid = t.session_id
            for s in range(1, 6):
                t.update_metrics(step=s, loss=1.0 / s)
        with kdkit.ProgressTracker(self.dir, {"v": 1}, 100, session_id=sid) as t:
            self.assertTrue(t.resumed)
            self.assertEqual(t.get_progress_summary()["steps_completed"], 5)
        with self.assertRaises(kdkit.NotFoundError) as cm:
            kdkit.ProgressTracker(self.dir, {"v": 1}, 100, session_id="training_x_00000000")
        self.assertIn(sid, str(cm.exception))  # the library names the session it holds
        # another config: the guide's rule, the old session is archived
        with kdkit.ProgressTracker(self.dir, {"v": 2}, 100) as t:
            self.assertNotEqual(t.session_id, sid)
            self.assertIn("archived", t.open_report)
        self.assertTrue(os.path.isdir(os.path.join(self.dir, "sessions", sid)))

    def test_closed_tracker_raises(self):
        t = kdkit.ProgressTracker(self.dir, {}, 10)
        t.close()
        t.close()  # idempotent
        self.assertTrue(t.closed)
        calls = [lambda: t.update_metrics(step=1, loss=1.0), t.save, lambda: t.record_pause(1),
                 t.get_progress_summary, t.get_recovery_checkpoint,
                 lambda: t.record_api_response("0" * 64, "x", 0.1),
                 lambda: t.record_connection_failure(0, "e"),
                 lambda: t.record_checkpoint(1, os.path.join(self.dir, "c"), 0),
                 lambda: t.session_id]
        for c in calls:
            with self.assertRaises(kdkit.StateError) as cm:
                c()
            self.assertIn("closed", str(cm.exception))
        with self.assertRaises(kdkit.StateError):
            with kdkit.ProgressTracker(self.dir, {}, 10) as t2:
                pass
            t2.save()

    def test_lock_and_library_errors(self):
        with kdkit.ProgressTracker(self.dir, {}, 10) as t:
            with self.assertRaises(kdkit.LockedError) as cm:
                kdkit.ProgressTracker(self.dir, {}, 10)
            self.assertIn(self.dir, str(cm.exception))
            outside = os.path.join(os.path.dirname(self.dir), "elsewhere.pt")
            with open(outside, "wb") as f:
                f.write(b"x")
            with self.assertRaises(kdkit.KdkitError) as cm:
                t.record_checkpoint(step=1, checkpoint_path=outside, dataset_position=0)
            self.assertIn("inside", str(cm.exception))
            with self.assertRaises(ValueError):
                t.update_metrics(step=1, loss=1.0, loss_components={"mse": 1.0})
        # the tracker is usable again after the failed calls were refused
        self.assertIn("healthy", kdtest.run_kdkit("verify", self.dir).stdout)

    def test_values_reach_the_files(self):
        with kdkit.ProgressTracker(self.dir, {"a": 1}, 50) as t:
            t.update_metrics(step=1, loss=float("nan"))
            t.update_metrics(step=2, loss=np.float32(1.5),
                             loss_components={"kd": 0.5, "ce": 1.0}, learning_rate=1e-3,
                             samples_processed=16, tokens_processed=512,
                             throughput_samples_per_sec=8.0, throughput_tokens_per_sec=256.0)
            t.record_api_response(prompt="p", response={"text": "hi", "n": np.int64(2)},
                                  cost=0.5, sample_index=7)
            t.record_connection_failure(retry_count=1, error=ConnectionError("reset"),
                                        http_status=503, possibly_billed=True)
            ck = os.path.join(self.dir, "checkpoint_2.bin")
            with open(ck, "wb") as f:
                f.write(b"weights")
            t.record_checkpoint(step=2, checkpoint_path=Path(ck), dataset_position=16,
                                recovery_tags=("keep",))
            t.record_api_response(prompt="q", response={"refusal": "no"}, cost=0.0,
                                  refusal=True)
            s = t.get_progress_summary()
            self.assertEqual(s["total_cost"], 0.5)
            self.assertEqual((s["api_responses_saved"], s["api_refusals"]), (2, 1))
            ledger = jsonl(self.dir, "api_recovery.jsonl")
            self.assertEqual([x.get("refusal", False) for x in ledger], [False, True])
            self.assertEqual(s["possibly_billed_failures"], 1)
            r = t.get_recovery_checkpoint()
            self.assertEqual((r.step, r.dataset_position, r.size), (2, 16, 7))
            self.assertEqual(t.get_best_checkpoint().step, 2)
            # threads share a tracker (calls serialise; the GIL is released
            # while a line is fsync'd)
            def work(base):
                for i in range(50):
                    t.record_api_response(prompt="t%d-%d" % (base, i), response="r", cost=0)
            th = [threading.Thread(target=work, args=(k,)) for k in range(2)]
            [x.start() for x in th]
            [x.join() for x in th]
        m = jsonl(self.dir, "metrics.jsonl")
        self.assertEqual([x["step"] for x in m], [1, 2])
        self.assertEqual(m[1]["loss"], 1.5)
        self.assertEqual(m[1]["samples_processed"], 16)
        api = jsonl(self.dir, "api_recovery.jsonl")
        self.assertEqual(len(api), 102)  # 1 + the refusal + 2 threads x 50
        self.assertEqual(json.loads(api[0]["response"]), {"text": "hi", "n": 2})
        self.assertEqual(api[0]["sample_index"], 7)
        f = jsonl(self.dir, "failures.jsonl")
        self.assertIn("reset", json.dumps(f[0]))
        self.assertIn("healthy", kdtest.run_kdkit("verify", self.dir).stdout)
        self.assertIn("2/50", kdtest.run_kdkit("status", self.dir).stdout)
        summary = json.loads(kdtest.run_kdkit("summary", self.dir, "--json").stdout)
        self.assertEqual(summary["steps_completed"], 2)
        self.assertTrue(math.isnan(kdkit.ProgressTracker(
            os.path.join(self.dir, "fresh"), {}, 5).get_progress_summary()["latest_loss"]))

    def test_read_progress_and_verify_while_open(self):
        with kdkit.ProgressTracker(self.dir, {"m": 1}, 40) as t:
            for s in range(1, 11):
                t.update_metrics(step=s, loss=2.0 - 0.1 * s)
            ck = os.path.join(self.dir, "checkpoint_10.bin")
            with open(ck, "wb") as f:
                f.write(b"0123456789")
            t.record_checkpoint(step=10, checkpoint_path=ck, dataset_position=80)
            seen = kdkit.read_progress(self.dir)  # no lock taken: works while open
            self.assertEqual(seen["steps_completed"], 10)
            self.assertEqual(seen["session_id"], t.session_id)
            self.assertEqual(kdkit.verify(self.dir), [])
        with open(ck, "r+b") as f:
            f.write(b"X")  # same size, other bytes
        problems = kdkit.verify(self.dir)
        self.assertEqual(len(problems), 1)
        self.assertEqual(problems[0]["code"], "KD_EMISMATCH")
        self.assertEqual(problems[0]["step"], 10)
        self.assertIn("checkpoint_10.bin", problems[0]["file"])
        self.assertEqual(kdkit.verify(self.dir, hash_checkpoints=False), [])
        with self.assertRaises(kdkit.NotFoundError) as cm:
            kdkit.verify(os.path.dirname(self.dir))
        self.assertIn("no session.json", str(cm.exception))
        with self.assertRaises(kdkit.NotFoundError):
            kdkit.read_progress(os.path.join(self.dir, "nothing"))
        with kdkit.ProgressTracker(self.dir, {"m": 1}, 40) as t:
            self.assertIsNone(t.get_recovery_checkpoint())  # the damaged file is skipped


if __name__ == "__main__":
    unittest.main()
