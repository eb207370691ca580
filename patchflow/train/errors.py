"""Errors of a training run that the CLI reports as a message and exit code 2 (no torch import here)."""


class TrainingError(RuntimeError):
    """Training cannot start or go on (an unwritable run directory, a full disk, non-finite steps).

    The message says what happened, which path is involved and, once a checkpoint exists, which one is intact
    and that `--resume` continues from it.
    """
