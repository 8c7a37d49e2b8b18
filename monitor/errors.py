"""Exception tree shared by the monitor and the retraining side."""


class DriftloopError(Exception):
    """Base class for every error driftloop raises on purpose."""


class ConfigError(DriftloopError):
    """A config key has an invalid value; the message names key, value and what is allowed."""


class DataError(DriftloopError):
    """A dataset file is missing, unreadable or has the wrong shape."""


class InsufficientSamplesError(DriftloopError):
    """A window or dataset is too small for the requested statistic."""


class NotFittedError(DriftloopError):
    """A detector or profile was used before it was built."""


class TrainingError(DriftloopError):
    """A retraining job failed (diverged, bad data, no matching modules)."""


class RegistryError(DriftloopError):
    """An adapter version is missing, duplicated or incomplete."""


class NotFoundError(DriftloopError):
    """A retrain run or other named record does not exist."""


class VersionNotFoundError(RegistryError, NotFoundError):
    """An adapter version name that is not in the registry."""
