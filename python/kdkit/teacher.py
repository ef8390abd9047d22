"""Teacher and TeacherCache over kdkit's teacher client and SQLite cache.

A config is a dict holding a "teacher" section (docs/teacher.md), or the
path of a YAML/JSON config file; it is read by the library
(kd_teacher_config_from_json), so unknown keys and bad values raise
ConfigError naming the key.  Cache keys are computed by the library
(kd_teacher_key): the same prompt under the same teacher config gives the
same key in Python, in `kdkit teacher ask` and in `kdkit train`.
"""

import ctypes
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

from . import _lib
from .errors import KdkitError, StateError
from .tracker import to_json


def _config_json(config):
    if isinstance(config, (str, os.PathLike)):
        out = ctypes.c_void_p()
        msg = _lib.msgbuf()
        rc = _lib.kd_ffi_config_load_yaml(_lib.enc(os.fspath(config)), ctypes.byref(out), msg,
                                          _lib.MSG_CAP)
        _lib.check(rc, msg.value)
        return _lib.take_string(out)
    return to_json(config)


def _req_args(prompt, messages, params, sample_index):
    if prompt is None and messages is None:
        raise ValueError("a prompt or messages are required")
    return (_lib.enc(prompt), None if messages is None else to_json(messages).encode(),
            None if params is None else to_json(params).encode(),
            -1 if sample_index is None else int(sample_index))


class _Client:
    def __init__(self, config, tracker, cache_only):
        self._h = None
        h = ctypes.c_void_p()
        msg = _lib.msgbuf()
        th = tracker._handle() if tracker is not None else None
        rc = _lib.kd_ffi_teacher_open(ctypes.byref(h), _config_json(config).encode("utf-8"),
                                      th, 1 if cache_only else 0, msg, _lib.MSG_CAP)
        _lib.check(rc, msg.value)
        self._h = h.value
        self._tracker = tracker  # keep it alive while the client uses it

    def _handle(self):
        if self._h is None:
            raise StateError(-32010, "%s: the %s is closed" % (
                _lib.dec(_lib.kd_strerror(-32010)), type(self).__name__))
        return self._h

    def _check(self, rc):
        if rc != 0:
            _lib.check(rc, _lib.kd_ffi_teacher_errmsg(self._h))

    def key(self, prompt=None, messages=None, params=None, sample_index=None):
        """(key, prompt_hash) of a request: kd_teacher_key's recipe."""
        key = ctypes.create_string_buffer(_lib.SHA_HEX)
        ph = ctypes.create_string_buffer(_lib.SHA_HEX)
        self._check(_lib.kd_ffi_teacher_key(self._handle(),
                                            *_req_args(prompt, messages, params, sample_index),
                                            key, ph, None))
        return key.value.decode(), ph.value.decode()

    def close(self):
        h, self._h = self._h, None
        if h is not None:
            _lib.kd_ffi_teacher_close(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class TeacherCache(_Client):
    """The guide's TeacherCache on kdkit's SQLite response cache.

    TeacherCache(config): config's teacher section names the cache file
    (teacher.cache.path), the teacher version, provider, model, endpoint and
    default parameters, which all enter the key.  Nothing is ever sent and
    no API key is needed.
    """

    def __init__(self, config):
        super().__init__(config, None, True)
        if not _lib.kd_ffi_teacher_cache(self._h):
            self.close()
            raise StateError(-32010, "TeacherCache: the config has no teacher cache path")

    def get_entry(self, prompt=None, messages=None, params=None, sample_index=None):
        """The whole cache entry of a request as a dict (key, body, text,
        cost, tokens, created_at, ...), or None on a miss."""
        out = ctypes.c_void_p()
        rc = _lib.kd_ffi_cache_get(self._handle(),
                                   *_req_args(prompt, messages, params, sample_index),
                                   ctypes.byref(out))
        if rc == -32006:  # KD_ENOTFOUND: a miss
            return None
        self._check(rc)
        return json.loads(_lib.take_string(out))

    def get(self, prompt=None, messages=None, params=None, sample_index=None):
        """The cached answer text for a request, or None on a miss (the
        guide's teacher_cache.get(prompt))."""
        en = self.get_entry(prompt, messages, params, sample_index)
        return None if en is None else en["text"]

    def put(self, prompt=None, response=None, messages=None, params=None, sample_index=None,
            cost=0.0):
        """Store an answer (the guide's teacher_cache.put(prompt, response)).
        response: the answer text, or a whole OpenAI response body (dict or
        JSON text starting with '{').  Returns False when an entry was already
        there (the first paid answer wins)."""
        if response is None:
            raise ValueError("put: response is required")
        if isinstance(response, str) and not response.lstrip().startswith("{"):
            text, is_text = response, 1
        elif isinstance(response, str):
            text, is_text = response, 0
        else:
            text, is_text = to_json(response, "response"), 0
        inserted = ctypes.c_int()
        self._check(_lib.kd_ffi_cache_put(self._handle(),
                                          *_req_args(prompt, messages, params, sample_index),
                                          _lib.enc(text), is_text, float(cost),
                                          ctypes.byref(inserted)))
        return bool(inserted.value)


@dataclass
class TeacherResult:
    """One answer from Teacher.ask."""
    text: Optional[str]
    cost: float
    cache_hit: bool
    from_fallback: bool
    attempts: int
    key: str
    prompt_hash: str
    body: Optional[str] = None
    finish_reason: Optional[str] = None
    request_id: Optional[str] = None
    response_model: Optional[str] = None
    prompt_tokens: int = -1
    completion_tokens: int = -1
    latency_ms: float = 0.0
    possibly_billed: int = 0
    tokens: List[dict] = field(default_factory=list)


class Teacher(_Client):
    """kdkit's teacher client: cache, budget reservation, intent journal,
    retries with backoff, ledger line in the tracker's api_recovery.jsonl
    (durable before the answer is returned), failures in failures.jsonl.

    Teacher(config, tracker): the tracker may be None only when both prices
    are 0 and there is no budget.  The API key comes from the environment
    variable teacher.api_key_env names.  While a Teacher uses the tracker, do
    not call the tracker from another thread.
    """

    def __init__(self, config, tracker=None):
        super().__init__(config, tracker, False)

    def ask(self, prompt=None, messages=None, params=None, sample_index=None) -> TeacherResult:
        """One request through the whole paid path (the GIL is released while
        it waits).  Raises the library's error (BudgetError, QuotaError,
        HTTPError, DeadlineError, ...) when no answer could be had."""
        out = ctypes.c_void_p()
        rc = _lib.kd_ffi_teacher_ask(self._handle(),
                                     *_req_args(prompt, messages, params, sample_index),
                                     ctypes.byref(out))
        text = _lib.take_string(out)
        if rc != 0:
            doc = json.loads(text) if text else {}
            _lib.check(rc, doc.get("error") or _lib.kd_ffi_teacher_errmsg(self._h))
        return _result(json.loads(text))

    def ask_many(self, prompts=None, messages=None, params=None, sample_indices=None,
                 raise_on_error=True):
        """Several requests at once (up to teacher.max_in_flight in flight,
        kd_teacher_ask_many).  prompts: a list of str (or None entries where
        messages gives the request); messages: a list of message lists.
        Returns one TeacherResult per request, in order.  A request that
        failed raises its error (raise_on_error) after every other request
        has finished, paid ones recorded and cached, so asking again costs
        only the failed ones; with raise_on_error=False its slot holds the
        KdkitError instead."""
        n = len(prompts if prompts is not None else messages or [])
        if messages is not None and prompts is not None and len(messages) != len(prompts):
            raise ValueError("prompts and messages must have the same length")
        ps = _lib.c_str_array(list(prompts) if prompts is not None else [None] * n)
        ms = _lib.c_str_array([None if m is None else to_json(m) for m in messages]
                              if messages is not None else [None] * n)
        si = None
        if sample_indices is not None:
            if len(sample_indices) != n:
                raise ValueError("sample_indices must have one entry per request")
            si = (ctypes.c_int64 * max(1, n))(*[-1 if x is None else int(x)
                                               for x in sample_indices])
        out = ctypes.c_void_p()
        rc = _lib.kd_ffi_teacher_ask_many(self._handle(), n, ps, ms,
                                          None if params is None else to_json(params).encode(),
                                          si, ctypes.byref(out))
        text = _lib.take_string(out)
        if text is None:
            _lib.check(rc or -32002, _lib.kd_ffi_teacher_errmsg(self._h))
        results = []
        for d in json.loads(text):
            if d["rc"] != 0:
                try:
                    _lib.check(d["rc"], d["error"])
                except KdkitError as exc:
                    results.append(exc)
            else:
                results.append(_result(d))
        if raise_on_error:
            for r in results:
                if isinstance(r, KdkitError):
                    raise r
        return results

    def generate(self, prompt, **kw) -> str:
        """The answer text only (the guide's teacher_model.generate(prompt))."""
        return self.ask(prompt, **kw).text


def _result(d):
    return TeacherResult(text=d["text"], cost=d["cost"], cache_hit=d["cache_hit"],
                         from_fallback=d["from_fallback"], attempts=d["attempts"],
                         key=d["key"], prompt_hash=d["prompt_hash"], body=d["body"],
                         finish_reason=d["finish_reason"], request_id=d["request_id"],
                         response_model=d["response_model"], prompt_tokens=d["prompt_tokens"],
                         completion_tokens=d["completion_tokens"], latency_ms=d["latency_ms"],
                         possibly_billed=d["possibly_billed"], tokens=d["tokens"])
