"""Errors that reach the user as a one-line message (the CLI exits 2 on them)."""


class MatekdError(Exception):
    """A failure the user can act on; the message says what and how."""


class ParamsError(MatekdError):
    """params.yaml (or an override) is invalid."""


class DataError(MatekdError):
    """Raw or prepared data is missing, corrupt or malformed."""


class CacheError(MatekdError):
    """A teacher CAM cache is missing, corrupt or stale."""


class TrainingDiverged(MatekdError):
    """The loss became NaN or infinite."""


class TrackingError(MatekdError):
    """The MLflow tracking store cannot be reached."""
