"""The `Store` seam: where one backup's checkpoints live.

The callback, the writer, restore and the CLI talk to this interface only;
`stores.location.open_store` picks the implementation for a location. The
implementations: `stores.local.LocalStore` (a directory),
`stores.object_store.ObjectStore` (a bucket prefix), and
`stores.parts.ProcessParts` (one process of a multi-process job, writing
its part through the location's own store).
"""

from __future__ import annotations

import abc
import dataclasses
import errno
import threading
from collections.abc import Callable
from typing import Any

from fastbackup.format import CheckpointReader, EncodedCheckpoint


@dataclasses.dataclass(frozen=True)
class CommitResult:
    """What one durable write did."""

    path: str
    step: int
    nbytes: int
    seconds: float


class WriteCancelled(Exception):
    """A commit was abandoned on request; its temporary file is removed."""


class Store(abc.ABC):
    """Where one backup's checkpoints live: the one storage seam.

    Every implementation guarantees the same thing: `list_checkpoints`
    returns only checkpoints whose every byte was stored before they were
    listed (committed), so a crash at any instant leaves the previous
    checkpoints readable.

    One `fit` calls a store in this order:

    1. `acquire_lock`: the job takes the backup for itself; a second job
       fails here, before its first step.
    2. `remove_temp_files`: what writers killed mid-write left is removed
       (only safe under the lock: a live writer's files look the same).
    3. `list_checkpoints`, then `open_checkpoint` of the newest (restore,
       and the next step number).
    4. `commit`, then `prune`, once per save, on the writer thread;
       `write_object` once per fit for the model's config.
    5. `end_fit`, once the writes are done; then `remove_all` (the backup is
       deleted after a successful fit), `release_lock`, and
       `end_fit(after_cleanup=True)`.

    In a multi-process job every process calls every step on its own
    `ProcessParts`, which makes process 0 lock, clean up, commit manifests,
    prune, write objects and delete for the job, and the others wait for
    its outcome at 1, 2 and 4; `end_fit` is where all of them meet.

    Attributes:
        location: the backup location as the user gave it, for messages.
    """

    location: str

    # 1-2, 5: the job's hold on the backup ------------------------------

    @abc.abstractmethod
    def acquire_lock(self, owner: Any, flush: Callable[[], None]) -> None:
        """Takes the backup's lock for `owner` (a callback).

        Args:
            owner: the callback taking the lock (held by weak reference).
            flush: waits until the owner's pending writes are done.

        Raises:
            BackupDirLockedError: another job, or another callback training
                on another thread of this process, uses the backup.
        """

    @abc.abstractmethod
    def list_temp_files(self) -> list[str]:
        """Lists what writers killed mid-write left (or a live writer's)."""

    @abc.abstractmethod
    def remove_temp_files(self) -> list[str]:
        """Removes what writers killed mid-write left; call under the lock.

        Returns:
            The locations removed.
        """

    def end_fit(self, after_cleanup: bool = False) -> None:
        """Waits for the job's other processes at the end of a `fit`.

        A store of one process has none: it returns at once. See
        `stores.parts.ProcessParts.end_fit`.

        Args:
            after_cleanup: the call after the backup was deleted or unlocked.
        """

    @abc.abstractmethod
    def exists(self) -> bool:
        """True if the backup location holds anything."""

    @abc.abstractmethod
    def remove_all(self) -> None:
        """Deletes the whole backup, as Keras does after a successful `fit`."""

    @abc.abstractmethod
    def release_lock(self, owner: Any) -> None:
        """Releases the lock if `owner` holds it."""

    # 3-4: checkpoints -----------------------------------------------------

    @abc.abstractmethod
    def list_checkpoints(self) -> list[tuple[int, str]]:
        """Lists `(step, location)` of the committed checkpoints, newest first.

        Returns an empty list when the backup does not exist.
        """

    @abc.abstractmethod
    def open_checkpoint(self, location: str) -> CheckpointReader:
        """Opens one checkpoint listed by `list_checkpoints` for reading.

        Raises:
            CheckpointCorruptError: it is not a valid checkpoint.
            OSError: it cannot be read.
        """

    @abc.abstractmethod
    def commit(self, step: int, encoded: EncodedCheckpoint, sync: bool,
               cancel: threading.Event | None = None,
               direct: bool = False) -> CommitResult:
        """Stores one checkpoint atomically: whole, or not at all.

        Args:
            step: the checkpoint's sequence number.
            encoded: the checkpoint to write (its segments are streamed).
            sync: make it durable before returning (local disks).
            cancel: when set, the commit stops and raises `WriteCancelled`,
                leaving nothing behind.
            direct: write with O_DIRECT (local disks).

        Raises:
            OSError: the write failed; earlier checkpoints are untouched.
            WriteCancelled: `cancel` was set before the commit point.
        """

    @abc.abstractmethod
    def prune(self, keep: int) -> None:
        """Removes all but the `keep` newest checkpoints (after a commit)."""

    # Small named objects ------------------------------------------------------

    @abc.abstractmethod
    def write_object(self, name: str, data: bytes) -> None:
        """Stores a small named object atomically (replacing any previous).

        For sidecar data such as a model's configuration; call it while
        holding the lock (a local store's directory exists from then on).
        The object is removed with the backup by `remove_all`.

        Args:
            name: a plain name (`names.check_object_name`).
            data: the whole content.

        Raises:
            ValueError: `name` is not a valid object name.
        """

    @abc.abstractmethod
    def read_object(self, name: str) -> bytes | None:
        """Reads a small object stored by `write_object`; `None` if absent."""


class LocationStore(Store):
    """The store of a backup location itself: a directory, a bucket prefix.

    Besides checkpoints it holds the parts of multi-process checkpoints:
    files named `names.part_name(...)`, written by each process's
    `ProcessParts`, never listed as checkpoints; a manifest committed with
    `commit` makes them one, and restore reads them with `open_part`.
    """

    @abc.abstractmethod
    def write_part(self, name: str, step: int, encoded: EncodedCheckpoint,
                   sync: bool, cancel: threading.Event | None = None,
                   direct: bool = False) -> CommitResult:
        """Stores one process's part durably and atomically, as `name`.

        Same guarantees and errors as `commit`, but nothing is committed:
        the part counts only once a manifest naming it is.
        """

    @abc.abstractmethod
    def open_part(self, name: str) -> CheckpointReader:
        """Opens the part `name` for reading (see `open_checkpoint`)."""

    @abc.abstractmethod
    def list_parts(self) -> list[str]:
        """Names of every part file, committed or not."""

    @abc.abstractmethod
    def remove_parts(self, names: list[str]) -> None:
        """Deletes the parts `names` (missing ones are ignored)."""


def io_error(what: str, url: str, e: BaseException) -> OSError:
    """An `EIO` naming `url`, for a request the client gave up on after its
    retries (`what`: "uploading ckpt-...fbk", "reading the lease", ...)."""
    err = OSError(errno.EIO, f"{what} failed: {e}", url)
    err.__cause__ = e
    return err
