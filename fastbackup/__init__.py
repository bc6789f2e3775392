"""fastbackup: an asynchronous, crash-safe `keras.callbacks.BackupAndRestore`.

Switching is one line::

    callbacks = [fastbackup.BackupAndRestore("/tmp/backup", save_freq=100)]
"""

from fastbackup.callback import BackupAndRestore
from fastbackup.errors import (
    BackupDirLockedError,
    BackupWriteError,
    CheckpointCorruptError,
    CheckpointMismatchError,
    ConfigError,
    FastBackupError,
)

__version__ = "0.1.0"

__all__ = [
    "BackupAndRestore",
    "BackupDirLockedError",
    "BackupWriteError",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "ConfigError",
    "FastBackupError",
    "__version__",
]
