"""ProgressTracker: the guide's tracker over libkdkit's (src/tracker).

The files are the library's: session.json, progress.json, metrics.jsonl,
api_recovery.jsonl, checkpoints.json, failures.jsonl, events.jsonl in the
output directory, the same ones `kdkit status`, `kdkit verify` and the
report read.  This module adds no rule of its own: it converts arguments and
calls include/kdkit/ffi.h.
"""

import ctypes
import json
import math
import os
import threading
from dataclasses import dataclass
from typing import Optional

from . import _lib
from .errors import CODES, StateError

_LOSS_KEYS = ("kd", "ce", "intermediate")
# progress.json numbers that are null while unknown; NaN in Python
_UNKNOWN_IS_NAN = ("estimated_remaining_hours", "latest_loss", "learning_rate",
                   "steps_per_sec", "samples_per_sec", "tokens_per_sec")


def _jsonable(o):
    """json.dumps default: numpy scalars/arrays, torch scalars, paths, sets refused."""
    item = getattr(o, "item", None)
    if callable(item) and getattr(o, "ndim", 0) == 0 and not isinstance(o, (bytes, str)):
        return item()
    tolist = getattr(o, "tolist", None)
    if callable(tolist) and hasattr(o, "shape"):
        return tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError("config value of type %s is not JSON-serialisable" % type(o).__name__)


def to_json(value, what="config"):
    """JSON text of a Python value: dicts/lists of the usual types, numpy
    scalars and arrays, paths.  NaN/Infinity are refused (not JSON)."""
    try:
        return json.dumps(value, default=_jsonable, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError("%s: %s" % (what, exc)) from None


def _num(x, unset=_lib.UNSET):
    return unset if x is None else float(x)


@dataclass(frozen=True)
class RecoveryCheckpoint:
    """The checkpoint to resume from (kd_tracker_recovery_checkpoint)."""
    checkpoint_path: str
    dataset_position: int
    step: int
    size: int
    hash: str           # SHA-256 hex of the file, checked against the manifest
    loss: float         # NaN when unknown
    skipped: str = ""   # newer checkpoints that were skipped and why


class ProgressTracker:
    """The guide's ProgressTracker.

    ProgressTracker(output_dir, config, total_steps, session_id=None,
    new_session=False): opens (creating) the output directory.  config is
    any JSON-serialisable dict; its canonical SHA-256 is the session's
    config_hash.  With session_id, exactly that session is resumed
    (NotFoundError if the directory holds another).  One tracker per
    directory (LockedError otherwise).  Methods serialise on an internal lock,
    so Python threads may share a tracker.
    """

    def __init__(self, output_dir="training_progress", config=None, total_steps=0,
                 session_id=None, new_session=False):
        self._mu = threading.Lock()
        self._h = None
        self.output_dir = os.fspath(output_dir)
        cfg = to_json({} if config is None else config)
        h = ctypes.c_void_p()
        msg = _lib.msgbuf()
        rc = _lib.kd_ffi_tracker_open(ctypes.byref(h), _lib.enc(self.output_dir),
                                      cfg.encode("utf-8"), int(total_steps),
                                      _lib.enc(session_id), 1 if new_session else 0, msg,
                                      _lib.MSG_CAP)
        _lib.check(rc, msg.value)
        self._h = h.value
        self.total_steps = int(total_steps)
        self._samples = 0
        self._tokens = 0

    # -- plumbing -------------------------------------------------------------
    def _handle(self):
        if self._h is None:
            raise StateError(-32010, "%s: the ProgressTracker of %s is closed" % (
                _lib.dec(_lib.kd_strerror(-32010)), self.output_dir))
        return self._h

    def _check(self, rc):
        if rc != 0:
            _lib.check(rc, _lib.kd_tracker_errmsg(self._h))

    @property
    def session_id(self) -> str:
        with self._mu:
            return _lib.dec(_lib.kd_tracker_session_id(self._handle()))

    @property
    def config_hash(self) -> str:
        with self._mu:
            return _lib.dec(_lib.kd_tracker_config_hash(self._handle()))

    @property
    def resumed(self) -> bool:
        """True when opening resumed an existing session."""
        with self._mu:
            return bool(_lib.kd_tracker_resumed(self._handle()))

    @property
    def open_report(self) -> str:
        """What opening did besides the obvious (repairs, archived sessions)."""
        with self._mu:
            return _lib.dec(_lib.kd_tracker_open_report(self._handle()))

    @property
    def closed(self) -> bool:
        return self._h is None

    # -- the guide's methods --------------------------------------------------
    def update_metrics(self, step, loss, loss_components=None, learning_rate=None,
                       samples_processed=None, tokens_processed=None,
                       throughput_samples_per_sec=None, throughput_tokens_per_sec=None):
        """Record one step (buffered; reaches metrics.jsonl at the next flush).

        loss_components may hold "kd", "ce", "intermediate" (numbers, numpy
        or 0-d torch values).  samples/tokens are cumulative; when omitted
        the last values given are kept.  Throughputs the caller does not give
        are computed by the tracker.  A step at or below the last one means a
        resume: the later lines are moved to metrics.rewound.jsonl.
        """
        kd = ce = inter = _lib.UNSET
        if loss_components:
            for k in loss_components:
                if k not in _LOSS_KEYS:
                    raise ValueError("loss_components: unknown key %r (kdkit records %s)"
                                     % (k, ", ".join(_LOSS_KEYS)))
            kd = _num(loss_components.get("kd"))
            ce = _num(loss_components.get("ce"))
            inter = _num(loss_components.get("intermediate"))
        if samples_processed is not None:
            self._samples = int(samples_processed)
        if tokens_processed is not None:
            self._tokens = int(tokens_processed)
        with self._mu:
            h = self._handle()
            rc = _lib.kd_ffi_tracker_update(
                h, int(step), _num(loss, math.nan), kd, ce, inter, _num(learning_rate),
                self._samples, self._tokens, _num(throughput_samples_per_sec),
                _num(throughput_tokens_per_sec))
            self._check(rc)

    def record_checkpoint(self, step, checkpoint_path, dataset_position=0, recovery_tags=None):
        """Record a checkpoint file that is already on disk (inside the output
        directory).  The tracker stats and hashes it, syncs metrics.jsonl and
        rewrites checkpoints.json and session.json atomically."""
        tags = list(recovery_tags or [])
        arr = _lib.c_str_array(tags)
        with self._mu:
            rc = _lib.kd_ffi_tracker_checkpoint(self._handle(), int(step),
                                                _lib.enc(os.fspath(checkpoint_path)),
                                                int(dataset_position), arr, len(tags))
            self._check(rc)

    def record_api_response(self, prompt_hash=None, response=None, cost=0.0, *, prompt=None,
                            request_hash=None, sample_index=None, refusal=False):
        """Append a paid teacher response to api_recovery.jsonl; durable
        (fsync'd) when this returns.  response: str, bytes or any
        JSON-serialisable object (stored as its JSON text).  Give
        prompt_hash (64 hex) or prompt (hashed with SHA-256).  refusal:
        True when the teacher refused (its message.refusal); the line is
        marked "refusal": true and counted in the summary's api_refusals."""
        if response is None:
            raise ValueError("record_api_response: response is required")
        if isinstance(response, bytes):
            text = response.decode("utf-8", "surrogateescape")
        elif isinstance(response, str):
            text = response
        else:
            text = to_json(response, "response")
        with self._mu:
            rc = _lib.kd_ffi_tracker_api_response(
                self._handle(), _lib.enc(prompt_hash), _lib.enc(prompt), _lib.enc(text),
                float(cost), _lib.enc(request_hash),
                -1 if sample_index is None else int(sample_index), 1 if refusal else 0)
            self._check(rc)

    def record_connection_failure(self, retry_count, error, http_status=0,
                                  possibly_billed=False):
        """Append to failures.jsonl and count it.  error: a message or an
        exception (its str); never put secrets in it."""
        with self._mu:
            rc = _lib.kd_ffi_tracker_failure(self._handle(), int(retry_count),
                                             _lib.enc(str(error)), int(http_status),
                                             1 if possibly_billed else 0)
            self._check(rc)

    def record_pause(self, duration=0.0):
        """A pause of `duration` seconds that just ended is excluded from
        active time and ETA; 0 marks "pausing now" (the gap until the session
        is reopened is excluded).  Everything is saved."""
        with self._mu:
            self._check(_lib.kd_tracker_record_pause(self._handle(), float(duration)))

    def save(self):
        """Write session.json and progress.json now (also autosaved)."""
        with self._mu:
            self._check(_lib.kd_tracker_save(self._handle()))

    def rewind(self, step):
        """Go back to checkpoint step `step` (kd_tracker_rewind): later
        metrics lines are moved to metrics.rewound.jsonl, kept."""
        with self._mu:
            self._check(_lib.kd_tracker_rewind(self._handle(), int(step)))

    def _recovery(self, best):
        out = ctypes.c_void_p()
        with self._mu:
            self._check(_lib.kd_ffi_tracker_recovery_json(self._handle(), best,
                                                          ctypes.byref(out)))
            doc = json.loads(_lib.take_string(out))
        if not doc.get("found"):
            return None
        loss = doc.get("loss")
        return RecoveryCheckpoint(checkpoint_path=doc["path"],
                                  dataset_position=doc["dataset_position"], step=doc["step"],
                                  size=doc["size"], hash=doc["sha256"],
                                  loss=math.nan if loss is None else loss,
                                  skipped=doc.get("skipped", ""))

    def get_recovery_checkpoint(self) -> Optional[RecoveryCheckpoint]:
        """The newest checkpoint whose file exists with its recorded size and
        SHA-256 (each candidate is hashed), else older ones; None if none."""
        return self._recovery(0)

    def get_best_checkpoint(self) -> Optional[RecoveryCheckpoint]:
        """The best checkpoint by loss among those not deleted (no file check)."""
        return self._recovery(1)

    def get_progress_summary(self) -> dict:
        """The progress.json document as a dict (the guide's keys and more).
        Numbers that are unknown (estimated_remaining_hours early on,
        latest_loss before any step) are float('nan') so the guide's
        f"{x:.1f}" formatting works."""
        out = ctypes.c_void_p()
        with self._mu:
            self._check(_lib.kd_tracker_summary_json(self._handle(), ctypes.byref(out)))
            doc = json.loads(_lib.take_string(out))
        for k in _UNKNOWN_IS_NAN:
            if k in doc and doc[k] is None:
                doc[k] = math.nan
        return doc

    def close(self):
        """Flush, save, release the directory lock.  Idempotent."""
        with self._mu:
            h, self._h = self._h, None
            if h is not None:
                msg = _lib.msgbuf()
                rc = _lib.kd_ffi_tracker_close(h, msg, len(msg))
                if rc != 0:
                    _lib.check(rc, "closing the tracker of %s failed: %s"
                               % (self.output_dir, _lib.dec(msg.value)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            if getattr(self, "_h", None) is not None:
                _lib.kd_tracker_close(self._h)
                self._h = None
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self):
        state = "closed" if self._h is None else "open"
        return "ProgressTracker(%r, %s)" % (self.output_dir, state)


def read_progress(output_dir="training_progress") -> dict:
    """The progress summary of a directory, read-only and without the lock
    (kd_session_inspect): for a monitor in another process while a run
    writes.  The same keys as ProgressTracker.get_progress_summary()."""
    out = ctypes.c_void_p()
    msg = _lib.msgbuf()
    rc = _lib.kd_ffi_session_inspect(_lib.enc(os.fspath(output_dir)), ctypes.byref(out), msg,
                                     _lib.MSG_CAP)
    _lib.check(rc, msg.value)
    doc = json.loads(_lib.take_string(out))
    for k in _UNKNOWN_IS_NAN:
        if k in doc and doc[k] is None:
            doc[k] = math.nan
    return doc


def verify(output_dir="training_progress", checkpoints_only=False, hash_checkpoints=True):
    """Check every file of a directory as `kdkit verify` does (read-only,
    no lock).  Returns the list of problems, each a dict with file, line,
    step, code (a KD_E* name), what and fix; [] means healthy.  Raises
    NotFoundError when the directory is not a kdkit output directory."""
    flags = (1 if checkpoints_only else 0) | (0 if hash_checkpoints else 2)
    out = ctypes.c_void_p()
    msg = _lib.msgbuf()
    rc = _lib.kd_ffi_session_verify(_lib.enc(os.fspath(output_dir)), flags, ctypes.byref(out),
                                    msg, _lib.MSG_CAP)
    if rc < 0:
        _lib.check(rc, msg.value)
    problems = json.loads(_lib.take_string(out))
    for p in problems:
        p["code"] = CODES.get(p["code"], "KD_OK" if p["code"] == 0 else str(p["code"]))
    return problems
