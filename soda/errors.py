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


class DivergenceError(SodaError):
    """The loss became NaN or infinite."""
