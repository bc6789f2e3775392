"""fastbackup: an asynchronous, crash-safe `keras.callbacks.BackupAndRestore`.

Switching is one line::

    callbacks = [fastbackup.BackupAndRestore("/tmp/backup", save_freq=100)]
"""

from typing import TYPE_CHECKING, Any

from fastbackup.errors import (
    BackupDirLockedError,
    BackupWriteError,
    CheckpointCorruptError,
    CheckpointMismatchError,
    ConfigError,
    FastBackupError,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fastbackup.callback import BackupAndRestore


def __getattr__(name: str) -> Any:
    # Importing Keras (and its backend) takes seconds; the CLI's `inspect`
    # and `verify` need none of it, so the callback is imported on use.
    if name == "BackupAndRestore":
        from fastbackup.callback import BackupAndRestore

        return BackupAndRestore
    raise AttributeError(f"module 'fastbackup' has no attribute {name!r}")

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
