"""Errors the trainer raises for bad input; each message is one line naming the problem and the fix."""


class WSMLError(Exception):
    """Base class: command-line layers print `str(err)` and exit non-zero."""


class ConfigError(WSMLError, ValueError):
    """A configuration value is invalid."""


class DataError(WSMLError):
    """A data set on disk is missing, malformed or holds an unreadable file."""


class TooManySkipped(DataError):
    """--skip-bad-images skipped more images than a run may train without (`wsml.data.loading`)."""


class DataChanged(DataError):
    """The data a run would train on is not the data it was asked to train on (`wsml.train.run`'s `data_id`)."""


class CheckpointError(WSMLError):
    """A checkpoint is missing, truncated or does not match the run."""


class TrainingDiverged(WSMLError):
    """The training loss became NaN or infinite."""
