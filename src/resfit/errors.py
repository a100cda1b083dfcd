"""The few exception types resfit raises; the CLI turns each into a one-line message and exit code."""

from __future__ import annotations


class ResfitError(Exception):
    """Base class: a problem the user can fix, with the offending path or value in the message."""

    exit_code = 1


class DataError(ResfitError):
    """The dataset cannot be used as given (missing folder, no classes, empty class...)."""

    exit_code = 3


class ImageReadError(ResfitError):
    """One image file cannot be decoded; carries the path and a short reason."""

    exit_code = 4

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class WeightsError(ResfitError):
    """Pretrained weights are missing, unsafe or do not fit the architecture."""

    exit_code = 5


class RunFolderError(ResfitError):
    """A run folder is missing, incomplete or from an incompatible version."""

    exit_code = 6


class ConfigError(ResfitError):
    """A configuration value is out of range or inconsistent."""

    exit_code = 2


class ExportError(ResfitError):
    """The model could not be exported, or the exported model disagrees with PyTorch."""

    exit_code = 7


class StorageError(ResfitError):
    """A file could not be written because its disk is full (or over quota); what was written before is intact."""

    exit_code = 8

    def __init__(self, path: str, free: str, then: str = "run the command again"):
        super().__init__(
            f"{path}: no space left on its disk ({free} free); it was not written, and what was written "
            f"before it is intact: free some space, then {then}"
        )
        self.path = path
        self.free = free
