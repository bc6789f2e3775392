"""Exceptions raised by fastbackup.

Every error a user can meet derives from `FastBackupError`, and each also
derives from the builtin that callers of Keras's callback already catch:
damage to a file is an `OSError` (Keras's own callback falls back to its
`.bkp` copy on `OSError`), a checkpoint that does not fit the model is a
`ValueError`.
"""

from __future__ import annotations


class FastBackupError(Exception):
    """Base class of every exception raised by fastbackup."""


class CheckpointCorruptError(FastBackupError, OSError):
    """A checkpoint file is damaged, truncated, foreign or hostile.

    Attributes:
        path: the file that failed verification.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"Checkpoint {self.path!r} is unusable: {reason}")

    def __str__(self) -> str:
        return f"Checkpoint {self.path!r} is unusable: {self.reason}"


class CheckpointMismatchError(FastBackupError, ValueError):
    """A valid checkpoint does not match the model it is restored into."""


class BackupWriteError(FastBackupError, OSError):
    """The background writer failed to make a checkpoint durable.

    The original exception (usually an `OSError` with errno and file name)
    is chained as `__cause__`.
    """


class BackupDirLockedError(FastBackupError, OSError):
    """Another callback or process is using the same `backup_dir`."""


class ConfigError(FastBackupError, ValueError):
    """A `FASTBACKUP_*` environment variable has an invalid value."""


class PeerError(FastBackupError, OSError):
    """Another process of a multi-process job failed, died or timed out."""
