"""Loading libkdkit and declaring the C functions the package calls.

The binding uses ctypes (standard library, nothing to install on Debian's
/usr/bin/python3) and only the flat functions of include/kdkit/ffi.h plus a
few scalar ones of error.h and tracker.h: no struct of kdkit's is mirrored
here, so the library's structs can grow without breaking this file.

ctypes.CDLL releases the GIL for the duration of every foreign call, so a
checkpoint being hashed, a ledger line being fsync'd or a teacher request
waiting on the network does not stop other Python threads.

Where the library is looked for, first match wins:
  1. $KDKIT_LIBRARY (a path to libkdkit.so)
  2. libkdkit.so next to this file (pip install puts it there)
  3. the source tree's build/libkdkit.so (make python)
  4. the system's libkdkit.so.0 (cmake --install)
"""

import ctypes
import ctypes.util
import os
from ctypes import (POINTER, c_char, c_char_p, c_double, c_int, c_int64, c_size_t,
                    c_uint64, c_void_p)

from .errors import raise_for

MSG_CAP = 1024  # KD_ERRMSG_MAX
SHA_HEX = 65    # KD_SHA256_HEX
MAX_DIMS = 8    # KD_TENSOR_MAX_DIMS
UNSET = -1e308  # KD_UNSET

_here = os.path.dirname(os.path.abspath(__file__))


def _candidates():
    env = os.environ.get("KDKIT_LIBRARY")
    if env:
        yield env
        return
    yield os.path.join(_here, "libkdkit.so")
    yield os.path.join(os.path.dirname(os.path.dirname(_here)), "build", "libkdkit.so")
    found = ctypes.util.find_library("kdkit")
    if found:
        yield found


def _load():
    tried = []
    for path in _candidates():
        if os.path.sep in path and not os.path.exists(path):
            tried.append(path + " (missing)")
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as exc:
            tried.append("%s (%s)" % (path, exc))
    raise ImportError("kdkit: cannot load libkdkit; tried: " + "; ".join(tried) +
                      ". Build it with `make python`, or set KDKIT_LIBRARY")


lib, path = _load()


def _fn(name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


P = c_void_p
CP = POINTER(c_char_p)
VP = POINTER(c_char_p)

kd_strerror = _fn("kd_strerror", c_char_p, c_int)
kd_version = _fn("kd_version", c_char_p)
kd_ffi_free = _fn("kd_ffi_free", None, c_void_p)
kd_ffi_config_load_yaml = _fn("kd_ffi_config_load_yaml", c_int, c_char_p, POINTER(c_void_p),
                              c_char_p, c_size_t)

# tracker
kd_ffi_tracker_open = _fn("kd_ffi_tracker_open", c_int, POINTER(c_void_p), c_char_p, c_char_p,
                          c_int64, c_char_p, c_int, c_char_p, c_size_t)
kd_ffi_tracker_update = _fn("kd_ffi_tracker_update", c_int, P, c_int64, c_double, c_double,
                            c_double, c_double, c_double, c_int64, c_int64, c_double, c_double)
kd_ffi_tracker_checkpoint = _fn("kd_ffi_tracker_checkpoint", c_int, P, c_int64, c_char_p,
                                c_int64, CP, c_size_t)
kd_ffi_tracker_api_response = _fn("kd_ffi_tracker_api_response", c_int, P, c_char_p, c_char_p,
                                  c_char_p, c_double, c_char_p, c_int64, c_int)
kd_ffi_tracker_failure = _fn("kd_ffi_tracker_failure", c_int, P, c_int, c_char_p, c_int, c_int)
kd_ffi_tracker_recovery_json = _fn("kd_ffi_tracker_recovery_json", c_int, P, c_int,
                                   POINTER(c_void_p))
kd_ffi_session_inspect = _fn("kd_ffi_session_inspect", c_int, c_char_p, POINTER(c_void_p),
                             c_char_p, c_size_t)
kd_ffi_session_verify = _fn("kd_ffi_session_verify", c_int, c_char_p, ctypes.c_uint,
                            POINTER(c_void_p), c_char_p, c_size_t)
kd_tracker_record_pause = _fn("kd_tracker_record_pause", c_int, P, c_double)
kd_tracker_save = _fn("kd_tracker_save", c_int, P)
kd_tracker_close = _fn("kd_tracker_close", c_int, P)
kd_ffi_tracker_close = _fn("kd_ffi_tracker_close", c_int, P, c_char_p, c_size_t)
kd_tracker_rewind = _fn("kd_tracker_rewind", c_int, P, c_int64)
kd_tracker_summary_json = _fn("kd_tracker_summary_json", c_int, P, POINTER(c_void_p))
kd_tracker_errmsg = _fn("kd_tracker_errmsg", c_char_p, P)
kd_tracker_session_id = _fn("kd_tracker_session_id", c_char_p, P)
kd_tracker_config_hash = _fn("kd_tracker_config_hash", c_char_p, P)
kd_tracker_dir = _fn("kd_tracker_dir", c_char_p, P)
kd_tracker_resumed = _fn("kd_tracker_resumed", c_int, P)
kd_tracker_open_report = _fn("kd_tracker_open_report", c_char_p, P)

# checkpoints
kd_ffi_ckpt_open = _fn("kd_ffi_ckpt_open", c_int, POINTER(c_void_p), c_char_p, c_int64,
                       c_char_p, c_char_p, c_size_t)
kd_ckpt_close = _fn("kd_ckpt_close", None, P)
kd_ckpt_count = _fn("kd_ckpt_count", c_size_t, P)
kd_ffi_ckpt_tensor = _fn("kd_ffi_ckpt_tensor", c_int, P, c_size_t, POINTER(c_char_p),
                         POINTER(c_char_p), POINTER(c_int), POINTER(c_int64),
                         POINTER(c_void_p), POINTER(c_size_t))
kd_ckpt_meta_count = _fn("kd_ckpt_meta_count", c_size_t, P)
kd_ckpt_meta_get = _fn("kd_ckpt_meta_get", c_int, P, c_size_t, POINTER(c_char_p),
                       POINTER(c_char_p))
kd_ffi_ckpt_write = _fn("kd_ffi_ckpt_write", c_int, c_char_p, c_size_t, CP, CP, POINTER(c_int),
                        POINTER(c_int64), POINTER(c_void_p), POINTER(c_size_t), CP, c_size_t,
                        c_char_p, POINTER(c_uint64), c_char_p, c_size_t)

# teacher
kd_ffi_teacher_open = _fn("kd_ffi_teacher_open", c_int, POINTER(c_void_p), c_char_p, P, c_int,
                          c_char_p, c_size_t)
kd_ffi_teacher_errmsg = _fn("kd_ffi_teacher_errmsg", c_char_p, P)
kd_ffi_teacher_cache = _fn("kd_ffi_teacher_cache", c_void_p, P)
kd_ffi_teacher_key = _fn("kd_ffi_teacher_key", c_int, P, c_char_p, c_char_p, c_char_p, c_int64,
                         c_char_p, c_char_p, POINTER(c_void_p))
kd_ffi_teacher_ask = _fn("kd_ffi_teacher_ask", c_int, P, c_char_p, c_char_p, c_char_p, c_int64,
                         POINTER(c_void_p))
kd_ffi_teacher_ask_many = _fn("kd_ffi_teacher_ask_many", c_int, P, c_size_t, CP, CP, c_char_p,
                              POINTER(c_int64), POINTER(c_void_p))
kd_ffi_cache_get = _fn("kd_ffi_cache_get", c_int, P, c_char_p, c_char_p, c_char_p, c_int64,
                       POINTER(c_void_p))
kd_ffi_cache_put = _fn("kd_ffi_cache_put", c_int, P, c_char_p, c_char_p, c_char_p, c_int64,
                       c_char_p, c_int, c_double, POINTER(c_int))
kd_ffi_teacher_close = _fn("kd_ffi_teacher_close", c_int, P)


def enc(s):
    """str/PathLike/None -> bytes/None for a char * argument."""
    if s is None:
        return None
    if isinstance(s, bytes):
        return s
    return os.fsencode(s) if not isinstance(s, str) else s.encode("utf-8", "surrogateescape")


def dec(b):
    return None if b is None else b.decode("utf-8", "surrogateescape")


def take_string(ptr):
    """Copy a malloc'd C string returned through a void ** and free it."""
    if not ptr.value:
        return None
    try:
        return ctypes.string_at(ptr.value).decode("utf-8", "surrogateescape")
    finally:
        kd_ffi_free(ptr.value)


def msgbuf():
    return ctypes.create_string_buffer(MSG_CAP)


def check(rc, message):
    """Raise the KdkitError subclass of rc with `message` (str or bytes)."""
    if rc != 0:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        raise_for(rc, message or dec(kd_strerror(rc)))


def c_str_array(items):
    arr = (c_char_p * max(1, len(items)))()
    for i, s in enumerate(items):
        arr[i] = enc(s)
    return arr
