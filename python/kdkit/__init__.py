"""kdkit: the training recovery guide's Python API over libkdkit.

    from kdkit import ProgressTracker, TeacherCache, Teacher
    from kdkit import load_checkpoint, save_checkpoint, KdkitError

A thin ctypes binding (see docs/python.md): every rule — durability, the
file formats, recovery, cache keys, checkpoint validation — is the C
library's, and the files are the ones `kdkit status` and `kdkit verify` read.
"""

from . import _lib
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import (BudgetError, ConfigError, CorruptError, DeadlineError, HTTPError,
                     InvalidArgumentError, KdkitError, KdkitIOError, LimitError, LockedError,
                     MismatchError, NotFoundError, OutOfMemoryError, QuotaError, SignalError,
                     StateError, StepError, VersionError)
from .teacher import Teacher, TeacherCache, TeacherResult
from .tracker import ProgressTracker, RecoveryCheckpoint, read_progress, verify

__version__ = "0.1.0"
library_path = _lib.path
# The version of the libkdkit actually loaded (kd_version()); tests check it
# equals __version__.
library_version = _lib.dec(_lib.kd_version())

__all__ = [
    "ProgressTracker", "RecoveryCheckpoint", "TeacherCache", "Teacher", "TeacherResult",
    "load_checkpoint", "save_checkpoint", "KdkitError", "InvalidArgumentError",
    "OutOfMemoryError", "KdkitIOError", "CorruptError", "LockedError", "NotFoundError",
    "MismatchError", "LimitError", "VersionError", "StateError", "BudgetError", "QuotaError",
    "HTTPError", "DeadlineError", "SignalError", "ConfigError", "StepError", "library_path",
    "library_version",
    "read_progress", "verify",
]
