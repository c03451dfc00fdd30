"""Errors a user can act on. launch.py prints them as one line and exits non-zero."""


class SodaError(Exception):
    """Base class: the message alone says what is wrong and what to do."""


class ConfigError(SodaError, ValueError):
    pass


class DataError(SodaError):
    pass


class CheckpointError(SodaError):
    pass


class TrackingError(SodaError):
    pass


class TrackingLost(TrackingError):
    """The tracking store stopped answering during a run for longer than tracking.timeout_s."""


class SweepError(SodaError):
    """A sweep that cannot start or continue: bad sweep file, unusable storage, too many failures."""


class StorageLost(SweepError):
    """The Optuna storage stopped answering for longer than the sweep waits for it."""


class RunDirError(SodaError):
    """The run directory cannot be used: unwritable, in use by another process, or holding a
    run with other settings."""


class RendezvousError(SodaError):
    """A rank could not reach rank 0's rendezvous (MASTER_ADDR:MASTER_PORT) in time."""


class DivergenceError(SodaError):
    """The loss became NaN or infinite."""


class Terminated(BaseException):
    """SIGTERM arrived (`kill`, `timeout`, a container stopping). Like KeyboardInterrupt, a stop
    from outside, not an error of the run."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (cut at `limit` characters), or its type's name when
    it has none: what a one-line message quotes as the reason."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
