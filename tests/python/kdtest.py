"""Shared set-up of the Python binding's tests (tests/python/test_*.py).

Run by CTest (tests/python.cmake) with Debian's /usr/bin/python3.  The
environment names what the build produced:
  KDKIT_LIBRARY   a non-sanitized libkdkit.so (python cannot load the ASan one)
  KDKIT           the kdkit command
  KD_GPT_LOGITS   tests/python/gpt_logits.c's binary
  KD_SOURCE_DIR   the source tree (configs/, python/)
  KD_PY_WORK      a scratch directory for this test program
The package is imported from the source tree (python/), as `make python`
makes it importable.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

SRC = os.environ.get("KD_SOURCE_DIR") or os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(SRC, "python"))
sys.dont_write_bytecode = True

import kdkit  # noqa: E402  (a load failure is a test failure)

KDKIT = os.environ.get("KDKIT") or os.path.join(SRC, "build", "kdkit")


def workdir(name):
    """A fresh empty directory for one test."""
    base = os.environ.get("KD_PY_WORK") or tempfile.gettempdir()
    d = os.path.join(base, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def run_kdkit(*args, check=True, timeout=300):
    p = subprocess.run([KDKIT] + [str(a) for a in args], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError("kdkit %s exited %d\n%s\n%s" % (" ".join(map(str, args)),
                                                            p.returncode, p.stdout, p.stderr))
    return p


class ToyServer:
    """`kdkit serve --toy` on a free loopback port, for the teacher tests."""

    def __init__(self, d, *extra):
        self.port_file = os.path.join(d, "port")
        self.proc = subprocess.Popen([KDKIT, "serve", "--toy", "--port", "0", "--port-file",
                                      self.port_file] + list(extra),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = ""
            if os.path.exists(self.port_file):
                with open(self.port_file) as f:
                    text = f.read().strip()
            if text:
                self.port = int(text)
                return
            if self.proc.poll() is not None:
                raise AssertionError("kdkit serve exited: " + self.proc.stderr.read().decode())
            time.sleep(0.05)
        self.stop()
        raise AssertionError("kdkit serve did not start")

    @property
    def base_url(self):
        return "http://127.0.0.1:%d/v1" % self.port

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        if self.proc.stderr:
            self.proc.stderr.close()


def teacher_config(base_url, cache_path, **over):
    t = {"base_url": base_url, "model": "kdkit-toy", "endpoint": "chat",
         "teacher_version": "1",
         "prices": {"input_per_million": 0.15, "output_per_million": 0.60},
         "budget": {"max_cost": 5.0},
         "retry": {"max_attempts": 3, "base_delay_ms": 1, "max_delay_ms": 5},
         "cache": {"path": cache_path},
         "defaults": {"max_tokens": 16, "temperature": 0.0}}
    t.update(over)
    return {"teacher": t}


def free_port_unused():
    """A loopback port nothing listens on (for connection failures)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
