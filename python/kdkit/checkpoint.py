"""Checkpoints: kdkit's strict safetensors loader and atomic writer.

load_checkpoint maps the file read-only and validates every rule of
docs/checkpoint-format.md before a byte of tensor data is handed out; the
numpy arrays it returns are views of that mapping (no copy, read-only, the
mapping stays alive as long as any array does).  save_checkpoint writes a
temp file, fsyncs and renames it over the path (kd_ckpt_write).
"""

import ctypes
import os

import numpy as np

from . import _lib

_NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
       "I32": np.int32, "U8": np.uint8, "BF16": np.uint16}
_FROM_NP = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
            np.dtype(np.float64): "F64", np.dtype(np.int64): "I64",
            np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}


class _Mapping:
    """Owns one kd_ckpt handle; closed when the last array goes away."""

    def __init__(self, handle):
        self.h = handle

    def __del__(self):
        if self.h:
            _lib.kd_ckpt_close(self.h)
            self.h = None


def _open(path, expect_size, expect_sha256):
    h = ctypes.c_void_p()
    msg = _lib.msgbuf()
    rc = _lib.kd_ffi_ckpt_open(ctypes.byref(h), _lib.enc(os.fspath(path)),
                               -1 if expect_size is None else int(expect_size),
                               _lib.enc(expect_sha256), msg, _lib.MSG_CAP)
    _lib.check(rc, msg.value)
    return _Mapping(h.value)


def load_checkpoint(path, framework="numpy", copy=None, expect_size=None, expect_sha256=None):
    """Load a safetensors checkpoint through kdkit's strict loader.

    Returns (tensors, metadata): tensors maps names to numpy arrays (the
    default; zero-copy read-only views of the mapped file; BF16 comes back
    as uint16 bit patterns) or, with framework="torch", to torch tensors
    (copies by default because torch has no read-only tensors and writing
    into the mapping would crash the process; copy=False shares the mapping
    and you must not write to it).  metadata maps the __metadata__ strings.
    expect_size / expect_sha256 add the manifest check (MismatchError).
    Hostile or damaged files raise CorruptError / LimitError with the
    loader's message naming the file and rule.
    """
    if framework not in ("numpy", "torch"):
        raise ValueError("framework must be 'numpy' or 'torch'")
    m = _open(path, expect_size, expect_sha256)
    name, dtype = ctypes.c_char_p(), ctypes.c_char_p()
    ndim = ctypes.c_int()
    shape = (ctypes.c_int64 * _lib.MAX_DIMS)()
    data, nbytes = ctypes.c_void_p(), ctypes.c_size_t()
    tensors = {}
    for i in range(_lib.kd_ckpt_count(m.h)):
        _lib.check(_lib.kd_ffi_ckpt_tensor(m.h, i, ctypes.byref(name), ctypes.byref(dtype),
                                           ctypes.byref(ndim), shape, ctypes.byref(data),
                                           ctypes.byref(nbytes)), "checkpoint tensor %d" % i)
        dt = _lib.dec(dtype.value)
        shp = tuple(shape[d] for d in range(ndim.value))
        npdt = np.dtype(_NP[dt]).newbyteorder("<")
        if nbytes.value == 0:
            arr = np.zeros(shp, dtype=npdt)
        else:
            buf = (ctypes.c_char * nbytes.value).from_address(data.value)
            buf._kdkit_mapping = m  # keeps the mapping alive with the array
            arr = np.frombuffer(buf, dtype=npdt).reshape(shp)
        arr.flags.writeable = False
        tensors[_lib.dec(name.value)] = (arr, dt)
    meta = {}
    k, v = ctypes.c_char_p(), ctypes.c_char_p()
    for i in range(_lib.kd_ckpt_meta_count(m.h)):
        _lib.check(_lib.kd_ckpt_meta_get(m.h, i, ctypes.byref(k), ctypes.byref(v)),
                   "checkpoint metadata %d" % i)
        meta[_lib.dec(k.value)] = _lib.dec(v.value)
    if framework == "numpy":
        return {n: a for n, (a, _) in tensors.items()}, meta
    import torch
    import warnings
    out = {}
    for n, (a, dt) in tensors.items():
        if dt == "BF16":
            a = a.view(np.int16)  # torch has no uint16; the bits are what matter
        if copy is False:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "not writable"
                t = torch.from_numpy(a)
        else:
            t = torch.from_numpy(np.array(a))
        if dt == "BF16":
            t = t.view(torch.int16).view(torch.bfloat16) if t.dtype != torch.bfloat16 else t
        out[n] = t
    return out, meta


def _as_numpy(name, t):
    """(array, dtype name) of a numpy array or torch tensor, contiguous LE."""
    if hasattr(t, "detach") and hasattr(t, "cpu"):  # torch
        import torch
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return np.ascontiguousarray(t.view(torch.int16).numpy().view(np.uint16)), "BF16"
        t = t.numpy()
    a = np.asarray(t)
    dt = _FROM_NP.get(a.dtype.newbyteorder("=")) if a.dtype.byteorder in "<>=|" else None
    if dt is None:
        raise TypeError("tensor %r: dtype %s has no safetensors name kdkit writes "
                        "(F32, F16, BF16, F64, I64, I32, U8)" % (name, a.dtype))
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
    return a, dt


def save_checkpoint(path, tensors, metadata=None):
    """Write tensors (name -> numpy array or torch tensor) and metadata
    (str -> str) to `path` atomically and durably.  Returns {"size",
    "sha256"} of the file written (what record_checkpoint will record)."""
    names = sorted(tensors)
    arrays = []
    for n in names:
        arrays.append(_as_numpy(n, tensors[n]))
    k = len(names)
    ndims = (ctypes.c_int * max(1, k))()
    shapes = (ctypes.c_int64 * (max(1, k) * _lib.MAX_DIMS))()
    datas = (ctypes.c_void_p * max(1, k))()
    nbytes = (ctypes.c_size_t * max(1, k))()
    for i, (a, _) in enumerate(arrays):
        if a.ndim > _lib.MAX_DIMS:
            raise ValueError("tensor %r: %d dimensions, kdkit stores at most %d" %
                             (names[i], a.ndim, _lib.MAX_DIMS))
        ndims[i] = a.ndim
        for d, s in enumerate(a.shape):
            shapes[i * _lib.MAX_DIMS + d] = s
        datas[i] = a.ctypes.data if a.nbytes else None
        nbytes[i] = a.nbytes
    kv = []
    for mk, mv in (metadata or {}).items():
        if not isinstance(mk, str) or not isinstance(mv, str):
            raise TypeError("metadata: keys and values must be str (key %r)" % (mk,))
        kv += [mk, mv]
    sha = ctypes.create_string_buffer(_lib.SHA_HEX)
    size = ctypes.c_uint64()
    msg = _lib.msgbuf()
    rc = _lib.kd_ffi_ckpt_write(_lib.enc(os.fspath(path)), k, _lib.c_str_array(names),
                                _lib.c_str_array([dt for _, dt in arrays]), ndims, shapes,
                                datas, nbytes, _lib.c_str_array(kv), len(kv) // 2, sha,
                                ctypes.byref(size), msg, _lib.MSG_CAP)
    _lib.check(rc, msg.value)
    return {"size": size.value, "sha256": sha.value.decode()}
