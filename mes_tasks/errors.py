"""The mes_tasks exception hierarchy; every error carries a stable ``code``."""

from __future__ import annotations

MAX_LINE_CHARS = 500  # of an error shown as one line
DRIVER_DUMPS = (", Topology Description:",)  # pymongo appends its whole view of the servers


class MesError(Exception):
    """Base of every mes_tasks error."""

    code = "MES_ERROR"
    transient = False

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ConfigurationError(MesError):
    """A setting is missing, malformed or contradicts another one."""

    code = "CONFIG_INVALID"


class TransactionsUnsupported(ConfigurationError):
    """The MongoDB server cannot run multi-document transactions."""

    code = "TRANSACTIONS_UNSUPPORTED"


class PermanentError(MesError):
    """A failure that retrying cannot fix."""

    code = "PERMANENT_ERROR"


class ValidationError(PermanentError):
    """An update request is malformed; the code names the bad field."""

    code = "INVALID_INPUT"


class UnknownWorkOrder(PermanentError):
    """No work order has this id."""

    code = "UNKNOWN_WORK_ORDER"


class NegativeCounter(PermanentError):
    """Applying the quantity would take a counter below zero."""

    code = "NEGATIVE_COUNTER"


class RequestIdConflict(PermanentError):
    """The request id was already used for a different update."""

    code = "REQUEST_ID_CONFLICT"


class TransientError(MesError):
    """A failure that a later retry can fix."""

    code = "TRANSIENT_ERROR"
    transient = True


class LockBusy(TransientError):
    """Another holder kept the work-order lock for the whole wait."""

    code = "LOCK_BUSY"


class LockLost(TransientError):
    """The work-order lock expired or was taken over while held."""

    code = "LOCK_LOST"


class FenceLost(TransientError):
    """A newer lock holder bumped the work order's fencing epoch."""

    code = "FENCE_LOST"


class RedisUnavailable(TransientError):
    """Redis could not be reached."""

    code = "REDIS_UNAVAILABLE"


class MongoUnavailable(TransientError):
    """MongoDB could not be reached."""

    code = "MONGO_UNAVAILABLE"


class WriteConflict(TransientError):
    """The MongoDB transaction hit a write conflict and was aborted."""

    code = "WRITE_CONFLICT"


class QueueError(MesError):
    """The broker refused an update and the outbox could not record it: nothing was recorded."""

    code = "QUEUE_ERROR"


def one_line(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """An error's text as one bounded line, without a driver's diagnostic dump."""
    for dump in DRIVER_DUMPS:
        text = text.split(dump)[0]
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit]}…"
