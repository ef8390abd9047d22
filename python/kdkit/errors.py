"""kdkit's error codes (include/kdkit/error.h) as Python exceptions.

Every failing library call raises a subclass of KdkitError carrying the
library's code (``.code``, negative), its name (``.name``, e.g.
"KD_ECORRUPT") and the library's message (``str(exc)`` and ``.message``),
which names the file, line or field involved.
"""

CODES = {
    -32001: "KD_EINVAL", -32002: "KD_ENOMEM", -32003: "KD_EIO", -32004: "KD_ECORRUPT",
    -32005: "KD_ELOCKED", -32006: "KD_ENOTFOUND", -32007: "KD_EMISMATCH",
    -32008: "KD_ELIMIT", -32009: "KD_EVERSION", -32010: "KD_ESTATE", -32011: "KD_EBUDGET",
    -32012: "KD_EQUOTA", -32013: "KD_EHTTP", -32014: "KD_ETIMEOUT", -32015: "KD_EINTR",
    -32016: "KD_ECONFIG", -32017: "KD_ESTEP",
}
NUMBERS = {v: k for k, v in CODES.items()}


class KdkitError(Exception):
    """A libkdkit call failed.  .code is the KD_E* value, .message the text."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message
        self.name = CODES.get(code, "errno %d" % code if code > 0 else "code %d" % code)

    def __repr__(self):
        return "%s(%s, %r)" % (type(self).__name__, self.name, self.message)


class InvalidArgumentError(KdkitError, ValueError):
    """KD_EINVAL: an argument the library refuses."""


class OutOfMemoryError(KdkitError, MemoryError):
    """KD_ENOMEM."""


class KdkitIOError(KdkitError):
    """KD_EIO: a system call failed."""


class CorruptError(KdkitError):
    """KD_ECORRUPT: a file's content is invalid (message names file and field)."""


class LockedError(KdkitError):
    """KD_ELOCKED: the output directory is in use by another tracker."""


class NotFoundError(KdkitError):
    """KD_ENOTFOUND: file, session, key or checkpoint not found."""


class MismatchError(KdkitError):
    """KD_EMISMATCH: config hash, size or SHA-256 differs."""


class LimitError(KdkitError):
    """KD_ELIMIT: a size or count limit would be exceeded."""


class VersionError(KdkitError):
    """KD_EVERSION: unsupported format or schema version."""


class StateError(KdkitError):
    """KD_ESTATE: the call is not valid now (e.g. on a closed tracker)."""


class BudgetError(KdkitError):
    """KD_EBUDGET: the spending cap is reached."""


class QuotaError(KdkitError):
    """KD_EQUOTA: the provider says the quota is exhausted."""


class HTTPError(KdkitError):
    """KD_EHTTP: an HTTP failure that is not retried."""


class DeadlineError(KdkitError):
    """KD_ETIMEOUT: the deadline passed."""


class SignalError(KdkitError):
    """KD_EINTR: stopped by a signal; state was saved."""


class ConfigError(KdkitError, ValueError):
    """KD_ECONFIG: configuration invalid (message names the key)."""


class StepError(KdkitError):
    """KD_ESTEP: step numbers out of order."""


_CLASSES = {
    -32001: InvalidArgumentError, -32002: OutOfMemoryError, -32003: KdkitIOError,
    -32004: CorruptError, -32005: LockedError, -32006: NotFoundError, -32007: MismatchError,
    -32008: LimitError, -32009: VersionError, -32010: StateError, -32011: BudgetError,
    -32012: QuotaError, -32013: HTTPError, -32014: DeadlineError, -32015: SignalError,
    -32016: ConfigError, -32017: StepError,
}


def raise_for(code, message):
    raise _CLASSES.get(code, KdkitError)(code, message)
