"""fastbackup: an asynchronous, crash-safe `keras.callbacks.BackupAndRestore`.

Switching is one line::

    callbacks = [fastbackup.BackupAndRestore("/tmp/backup", save_freq=100)]

The data flows one way: `callback` (the Keras hooks, when to save) ->
`snapshot` (the copy into host memory, on the training thread) -> `writer`
(its own thread) -> `format` (the file's bytes) -> `stores` (where they go:
a directory, a bucket, one part per process) -> the C extension `_native`
(durable writes, CRC-32C; chosen with its pure-Python fallback in
`_compat`). Beside that line: `restore` and `resume` (loading, and
continuing mid-epoch), `preemption` (SIGTERM), `overlap` (a copy behind the
next step), `coordination` (the processes of a job agree through JAX's
coordination service), `backend` (all that differs between Keras's
backends), `config` (the `FASTBACKUP_*` variables), `model_config` and
`cli` (`python -m fastbackup inspect | verify | export | bench`).
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
