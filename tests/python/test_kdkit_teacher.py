"""kdkit.Teacher and kdkit.TeacherCache against `kdkit serve --toy`: the
whole paid path from Python (ledger line, cost, cache hit, retries recorded
as failures, budget), and the cache shared with the C side under the same
keys (an answer put from Python is a cache hit for `kdkit teacher ask`, an
answer the C client bought is found by TeacherCache.get).
"""
import hashlib
import http.server
import json
import os
import threading
import unittest

import kdtest
import kdkit


def ledger(d):
    p = os.path.join(d, "api_recovery.jsonl")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [json.loads(x) for x in f if x.strip()]


class TeacherPath(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.base = kdtest.workdir("teacher")
        cls.server = kdtest.ToyServer(cls.base)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        self.dir = kdtest.workdir("teacher/" + self._testMethodName)
        self.cache = os.path.join(self.dir, "cache.sqlite")
        self.cfg = kdtest.teacher_config(self.server.base_url, self.cache)
        self.out = os.path.join(self.dir, "run")

    def test_paid_then_cached(self):
        with kdkit.ProgressTracker(self.out, {"run": 1}, 10) as tr, \
                kdkit.Teacher(self.cfg, tr) as t:
            r = t.ask("What is distillation?")
            self.assertFalse(r.cache_hit)
            self.assertGreater(r.cost, 0)
            self.assertTrue(r.text)
            self.assertEqual(r.prompt_hash,
                             hashlib.sha256(b"What is distillation?").hexdigest())
            lines = ledger(self.out)
            self.assertEqual(len(lines), 1)  # durable before ask returned
            self.assertEqual(lines[0]["request_hash"], r.key)
            again = t.ask("What is distillation?")
            self.assertTrue(again.cache_hit)
            self.assertEqual(again.cost, 0)
            self.assertEqual(again.text, r.text)
            self.assertEqual(len(ledger(self.out)), 1)  # never bought twice
            self.assertAlmostEqual(tr.get_progress_summary()["total_cost"], r.cost)
            self.assertEqual(t.key("What is distillation?")[0], r.key)
            # the full request form: other parameters, another key
            other = t.ask(messages=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is distillation?"}],
                          params={"max_tokens": 8})
            self.assertNotEqual(other.key, r.key)
            self.assertFalse(other.cache_hit)
        # the cache file is the C side's: TeacherCache finds the paid answer
        with kdkit.TeacherCache(self.cfg) as c:
            self.assertEqual(c.get("What is distillation?"), r.text)
            en = c.get_entry("What is distillation?")
            self.assertEqual(en["key"], r.key)
            self.assertAlmostEqual(en["cost"], r.cost)
            self.assertIsNone(c.get("never asked"))
        self.assertIn("healthy", kdtest.run_kdkit("verify", self.out).stdout)

    def test_ask_many(self):
        prompts = ["p%d" % i for i in range(6)]
        with kdkit.ProgressTracker(self.out, {"run": 6}, 10) as tr, \
                kdkit.Teacher(self.cfg, tr) as t:
            first = t.ask("p0")
            rs = t.ask_many(prompts)
            self.assertEqual([r.key for r in rs], [t.key(p)[0] for p in prompts])
            self.assertEqual([r.cache_hit for r in rs], [True] + [False] * 5)
            self.assertEqual(rs[0].text, first.text)
            self.assertEqual(len(ledger(self.out)), 6)  # p0 once, the others once each
            again = t.ask_many(prompts[:3] + [None], messages=[None] * 3 + [
                [{"role": "user", "content": "p3"}]])
            self.assertTrue(all(r.cache_hit for r in again))
            self.assertEqual(again[3].key, rs[3].key)  # one user message == the prompt
            with self.assertRaises(ValueError):
                t.ask_many(["a"], sample_indices=[1, 2])
        poor = kdtest.teacher_config(self.server.base_url, self.cache,
                                     budget={"max_cost": 1e-9})
        with kdkit.ProgressTracker(self.out, {"run": 6}, 10) as tr, \
                kdkit.Teacher(poor, tr) as t:
            mixed = t.ask_many(["p1", "never seen"], raise_on_error=False)
            self.assertTrue(mixed[0].cache_hit)
            self.assertIsInstance(mixed[1], kdkit.BudgetError)
            with self.assertRaises(kdkit.BudgetError):
                t.ask_many(["p1", "never seen"])

    def test_put_from_python_is_a_hit_for_kdkit_teacher_ask(self):
        with kdkit.TeacherCache(self.cfg) as c:
            self.assertTrue(c.put("Define KD.", "Knowledge distillation, from Python."))
            self.assertFalse(c.put("Define KD.", "a second answer"))  # first one wins
            self.assertEqual(c.get("Define KD."), "Knowledge distillation, from Python.")
        cfg_file = os.path.join(self.dir, "teacher.yaml")
        with open(cfg_file, "w") as f:
            json.dump(self.cfg, f)  # JSON is YAML
        p = kdtest.run_kdkit("teacher", "ask", "--config", cfg_file, "--output-dir", self.out,
                             "Define KD.")
        self.assertIn("Knowledge distillation, from Python.", p.stdout)
        self.assertEqual(ledger(self.out), [])  # a hit: nothing paid, nothing recorded
        with kdkit.ProgressTracker(self.out, {"run": 2}, 10, new_session=True) as tr, \
                kdkit.Teacher(cfg_file, tr) as t:
            r = t.ask("Define KD.")
            self.assertTrue(r.cache_hit)
            self.assertEqual(r.text, "Knowledge distillation, from Python.")

    def test_retries_are_recorded_as_failures(self):
        srv = kdtest.ToyServer(self.dir, "--fault-script", "500,503,ok")
        try:
            cfg = kdtest.teacher_config(srv.base_url, self.cache)
            with kdkit.ProgressTracker(self.out, {"run": 3}, 10) as tr, \
                    kdkit.Teacher(cfg, tr) as t:
                r = t.ask("flaky")
                self.assertEqual(r.attempts, 3)
                s = tr.get_progress_summary()
                self.assertEqual(s["connection_failures"], 2)
                self.assertEqual(s["api_responses_saved"], 1)
        finally:
            srv.stop()

    def test_errors_carry_the_librarys_message(self):
        bad = kdtest.teacher_config(self.server.base_url, self.cache,
                                    retry={"max_attempts": 0})
        with kdkit.ProgressTracker(self.out, {"run": 4}, 10) as tr:
            with self.assertRaises(kdkit.ConfigError) as cm:
                kdkit.Teacher(bad, tr)
            self.assertIn("max_attempts", str(cm.exception))
            with self.assertRaises(kdkit.InvalidArgumentError) as cm:
                kdkit.Teacher(self.cfg, None)  # prices set: a ledger is required
            self.assertIn("tracker", str(cm.exception))
            down = kdtest.teacher_config("http://127.0.0.1:%d/v1" % kdtest.free_port_unused(),
                                         self.cache, retry={"max_attempts": 2,
                                                            "base_delay_ms": 1})
            with kdkit.Teacher(down, tr) as t:
                with self.assertRaises(kdkit.KdkitError) as cm:
                    t.ask("nobody listens")
                self.assertTrue(str(cm.exception))
            self.assertEqual(tr.get_progress_summary()["connection_failures"], 2)
            poor = kdtest.teacher_config(self.server.base_url, self.cache,
                                         budget={"max_cost": 1e-9})
            with kdkit.Teacher(poor, tr) as t:
                with self.assertRaises(kdkit.BudgetError):
                    t.ask("too expensive")
            with self.assertRaises(kdkit.InvalidArgumentError):
                with kdkit.TeacherCache(self.cfg) as c:
                    c.get("x", params={"no_such_param": 1})

    def test_the_gil_is_released_while_asking(self):
        # The teacher is a Python HTTP server in a thread of this process: it
        # can only answer if kd_teacher_ask runs without holding the GIL.
        answer = {"id": "py-1", "object": "chat.completion", "model": "kdkit-toy",
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "from a thread"}}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        th = threading.Thread(target=srv.serve_forever, daemon=True)
        th.start()
        try:
            cfg = kdtest.teacher_config("http://127.0.0.1:%d/v1" % srv.server_address[1],
                                        self.cache, retry={"max_attempts": 1},
                                        timeouts={"connect_ms": 5000, "total_ms": 20000})
            with kdkit.ProgressTracker(self.out, {"run": 5}, 10) as tr, \
                    kdkit.Teacher(cfg, tr) as t:
                r = t.ask("hello from the main thread")
                self.assertEqual(r.text, "from a thread")
                self.assertEqual(r.attempts, 1)
        finally:
            srv.shutdown()
            srv.server_close()


if __name__ == "__main__":
    unittest.main()
