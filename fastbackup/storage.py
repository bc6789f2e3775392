"""Where checkpoints live: the `Store` seam, and the local directory store.

`open_store(backup_dir)` picks the one implementation that handles a backup
location: `LocalStore` for a path, `fastbackup.object_store.ObjectStore` for
an `s3://` or `gs://` URL. The writer, the callback, restore and the CLI
talk to the `Store` interface only.

A local backup directory holds checkpoints named `ckpt-<step>.fbk`, where
`step` is a sequence number that only grows, a lock file, and small named
objects (`Store.write_object`: the model's config, `MODEL_CONFIG_NAME`,
written once per fit). A checkpoint is created under a temporary name and
renamed into place by the native extension; older checkpoints are removed
only after the new one is durable, so a crash at any instant leaves at
least one complete checkpoint.
"""

from __future__ import annotations

import abc
import dataclasses
import errno
import fcntl
import logging
import os
import re
import shutil
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from fastbackup._compat import native
from fastbackup.errors import BackupDirLockedError
from fastbackup.format import CheckpointReader, EncodedCheckpoint

log = logging.getLogger("fastbackup")

_CHECKPOINT_RE = re.compile(r"^ckpt-([0-9]{12})\.fbk$")
# One process's part of a multi-process checkpoint (`fastbackup.parts`).
PART_RE = re.compile(r"^ckpt-([0-9]{12})\.part-([0-9]{5})-of-([0-9]{5})\.fbk$")
# The model's config, stored once per fit for `export` (`model_config`).
MODEL_CONFIG_NAME = "model-config.json"
# Temporary files of checkpoints and of `write_object`'s small objects.
_TEMP_RE = re.compile(
    r"^\.(ckpt-[0-9]{12}\.fbk|[A-Za-z0-9][A-Za-z0-9_.-]{0,127})"
    r"\.[0-9a-f]{16}\.tmp$"
)
LOCK_NAME = ".fastbackup.lock"
# Names of the small objects of `Store.write_object`: a plain file name, so
# that it cannot escape the backup location nor look like a checkpoint.
_OBJECT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Small objects are a few KiB (a model's config); a larger one is not ours.
MAX_OBJECT_BYTES = 64 << 20


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint with sequence number `step`."""
    return f"ckpt-{step:012d}.fbk"


def part_name(step: int, index: int, count: int) -> str:
    """File name of process `index`'s part of checkpoint `step`."""
    return f"ckpt-{step:012d}.part-{index:05d}-of-{count:05d}.fbk"


def part_step(name: str) -> int | None:
    """The step of a part's file name, or `None` if not a part's name."""
    m = PART_RE.match(name)
    return int(m.group(1)) if m else None


@dataclasses.dataclass(frozen=True)
class CommitResult:
    """What one durable write did."""

    path: str
    step: int
    nbytes: int
    seconds: float


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """Lists `(step, path)` of the checkpoints in `directory`, newest first.

    Returns an empty list when the directory does not exist.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = _CHECKPOINT_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found, reverse=True)


def remove_temp_files(directory: str) -> list[str]:
    """Removes temporary files left by writers that were killed mid-write.

    Only call this while holding the directory's lock: a live writer's temp
    file looks the same.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if _TEMP_RE.match(name):
            path = os.path.join(directory, name)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write "
                 "in %s", len(removed), directory)
    return removed


class WriteCancelled(Exception):
    """A commit was abandoned on request; its temporary file is removed."""


# Segments are handed to the native writer in groups of about this size, so
# that a cancellation is seen within a fraction of a second.
_GROUP_BYTES = 64 << 20


def _groups(segments: list[Any]) -> list[list[Any]]:
    groups: list[list[Any]] = [[]]
    size = 0
    for segment in segments:
        if groups[-1] and size + len(segment) > _GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(segment)
        size += len(segment)
    return groups


def commit(
    directory: str,
    step: int,
    encoded: EncodedCheckpoint,
    sync: bool,
    cancel: threading.Event | None = None,
    direct: bool = False,
) -> CommitResult:
    """Writes one checkpoint durably and atomically (see `write_file`)."""
    return write_file(directory, checkpoint_name(step), step, encoded, sync,
                      cancel, direct)


def write_file(
    directory: str,
    name: str,
    step: int,
    encoded: EncodedCheckpoint,
    sync: bool,
    cancel: threading.Event | None = None,
    direct: bool = False,
) -> CommitResult:
    """Writes one checkpoint file durably and atomically, as `name`.

    The payload is streamed from the snapshot's buffers with its checksums
    computed in the same pass; the header and footer follow; then the
    native extension fsyncs, renames and fsyncs the directory, all with the
    GIL released.

    Args:
        directory: the backup directory.
        name: the file's name.
        step: the checkpoint's sequence number.
        encoded: the checkpoint to write.
        sync: fsync the file and the directory.
        cancel: when set, the commit stops at the next group of segments,
            removes its temporary file and raises `WriteCancelled`.
        direct: write with O_DIRECT, bypassing the page cache: the
            kernel's copy into the page cache costs the writing thread about
            1 s of CPU per GB, taken from training. Page-aligned segments
            (the snapshot's raw tensors) are written from where they are;
            the rest goes through the extension's aligned bounce buffer.
            Falls back to buffered I/O where the filesystem refuses
            O_DIRECT.

    Raises:
        OSError: with errno and file name; no temporary file is left behind
            and any previous checkpoint is untouched.
        WriteCancelled: `cancel` was set before the rename.
    """
    start = time.perf_counter()
    with native.AtomicFile(directory, name, sync=sync, direct=direct) as f:
        crcs: list[int] = []
        for group in _groups(encoded.segments):
            if cancel is not None and cancel.is_set():
                raise WriteCancelled(name)
            crcs.extend(f.write(group))
        f.write([encoded.trailer(crcs)], checksum=False)
        if cancel is not None and cancel.is_set():
            raise WriteCancelled(name)
        nbytes = f.bytes_written
        f.commit()
    return CommitResult(
        os.path.join(directory, name), step, nbytes,
        time.perf_counter() - start,
    )


def prune(directory: str, keep: int) -> None:
    """Removes all but the `keep` newest checkpoints (after a commit)."""
    for _, path in list_checkpoints(directory)[keep:]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_backup_dir(directory: str) -> None:
    """Deletes the whole backup directory, as Keras does after `fit`."""
    shutil.rmtree(directory, ignore_errors=False)


class _Held:
    def __init__(self, fd: int, owner: Any, flush: Callable[[], None]) -> None:
        self.fd = fd
        self.owner = weakref.ref(owner)
        # Strong: a collected callback's writer thread may still be writing.
        self.flush = flush
        self.thread = threading.get_ident()


_held: dict[str, _Held] = {}
_held_lock = threading.Lock()


def _is_lock_file(fd: int, directory: str) -> bool:
    """True if `fd` is still the lock file of `directory`."""
    try:
        st = os.stat(os.path.join(directory, LOCK_NAME))
    except (FileNotFoundError, NotADirectoryError):
        return False
    return os.path.samestat(st, os.fstat(fd))


def acquire_lock(directory: str, owner: Any, flush: Callable[[], None]) -> None:
    """Takes the advisory lock of `directory` for `owner` (a callback).

    Across processes, `flock` makes the second user fail. Inside one
    process, a callback may take the lock over from another one only when
    that one cannot be training concurrently: it was garbage-collected, or
    its last `fit` ran on this same thread (a `fit` interrupted by an
    exception never calls `on_train_end`, so its callback still holds the
    lock; rerunning `fit` with a new callback is the documented way to
    resume). The previous owner's pending writes are flushed first.

    Args:
        directory: the backup directory (created if missing).
        owner: the callback taking the lock (held by weak reference).
        flush: waits until the owner's pending writes are done.

    Raises:
        BackupDirLockedError: another process, or a callback training on
            another thread, uses the directory.
    """
    key = os.path.realpath(directory)
    with _held_lock:
        held = _held.get(key)
        if held is not None:
            claim_in_process(held, owner, flush, directory)
            if _is_lock_file(held.fd, directory):
                return
            # The directory was removed, lock file included, since the lock
            # was taken: that lock guards nothing any more. Take a new one.
            del _held[key]
            os.close(held.fd)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                other = os.pread(fd, 64, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise BackupDirLockedError(
                errno.EBUSY,
                "backup_dir is locked by another process "
                f"(pid {other or 'unknown'}); two trainings must not share "
                "one backup_dir",
                directory,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held[key] = _Held(fd, owner, flush)


def claim_in_process(
    held: Any, owner: Any, flush: Callable[[], None], location: str
) -> None:
    """Applies the in-process rules to a lock this process already holds.

    Shared by every store's lock (see `acquire_lock`): `owner` keeps the
    lock it holds, or takes it over from a callback that cannot be training
    concurrently (collected, or whose last `fit` ran on this thread), after
    flushing that callback's pending writes.

    Args:
        held: the process's record of the lock, with `owner` (a weak
            reference), `flush` and `thread` attributes.
        owner: the callback taking the lock.
        flush: waits until `owner`'s pending writes are done.
        location: the backup location, for the error.

    Raises:
        BackupDirLockedError: a callback training on another thread holds it.
    """
    previous = held.owner()
    if previous is owner:
        held.thread = threading.get_ident()
    elif previous is not None and held.thread != threading.get_ident():
        raise BackupDirLockedError(
            errno.EBUSY,
            "backup_dir is in use by another BackupAndRestore "
            "callback training in this process",
            location,
        )
    else:
        held.flush()
        held.owner = weakref.ref(owner)
        held.flush = flush
        held.thread = threading.get_ident()


def release_lock(directory: str, owner: Any) -> None:
    """Releases the lock if `owner` holds it."""
    key = os.path.realpath(directory)
    with _held_lock:
        held = _held.get(key)
        if held is None or held.owner() not in (owner, None):
            return
        del _held[key]
        os.close(held.fd)


class Store(abc.ABC):
    """Where one backup's checkpoints live: the one storage seam.

    One implementation per kind of location (`LocalStore`, and
    `fastbackup.object_store.ObjectStore` for buckets). Every implementation
    guarantees the same thing: `list_checkpoints` returns only checkpoints
    whose every byte was stored before they were listed (committed), so a
    crash at any instant leaves the previous checkpoints readable.

    Attributes:
        location: the backup location as the user gave it, for messages.
    """

    location: str

    @abc.abstractmethod
    def list_checkpoints(self) -> list[tuple[int, str]]:
        """Lists `(step, location)` of the committed checkpoints, newest first.

        Returns an empty list when the backup does not exist.
        """

    @abc.abstractmethod
    def commit(
        self,
        step: int,
        encoded: EncodedCheckpoint,
        sync: bool,
        cancel: threading.Event | None = None,
        direct: bool = False,
    ) -> CommitResult:
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

    @abc.abstractmethod
    def list_temp_files(self) -> list[str]:
        """Lists what writers killed mid-write left (or a live writer's)."""

    @abc.abstractmethod
    def remove_temp_files(self) -> list[str]:
        """Removes what writers killed mid-write left; call under the lock.

        Returns:
            The locations removed.
        """

    @abc.abstractmethod
    def exists(self) -> bool:
        """True if the backup location holds anything."""

    @abc.abstractmethod
    def remove_all(self) -> None:
        """Deletes the whole backup, as Keras does after a successful `fit`."""

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
    def release_lock(self, owner: Any) -> None:
        """Releases the lock if `owner` holds it."""

    @abc.abstractmethod
    def open_checkpoint(self, location: str) -> CheckpointReader:
        """Opens one checkpoint listed by `list_checkpoints` for reading.

        Raises:
            CheckpointCorruptError: it is not a valid checkpoint.
            OSError: it cannot be read.
        """

    @abc.abstractmethod
    def write_object(self, name: str, data: bytes) -> None:
        """Stores a small named object atomically (replacing any previous).

        For sidecar data such as a model's configuration; call it while
        holding the lock (a local store's directory exists from then on).
        The object is removed with the backup by `remove_all`.

        Args:
            name: a plain name: letters, digits, `_`, `.`, `-`; not a
                checkpoint's name.
            data: the whole content.

        Raises:
            ValueError: `name` is not a valid object name.
        """

    @abc.abstractmethod
    def read_object(self, name: str) -> bytes | None:
        """Reads a small object stored by `write_object`; `None` if absent."""

    def end_fit(self, after_cleanup: bool = False) -> None:
        """Waits for the job's other processes at the end of a `fit`.

        A store of one process has none: it returns at once. See
        `parts.ProcessParts.end_fit`.

        Args:
            after_cleanup: the call after the backup was deleted or unlocked.
        """

    # Parts of multi-process checkpoints (`fastbackup.parts`): files named
    # `part_name(...)`, never listed as checkpoints; a manifest committed
    # with `commit` makes them one.

    @abc.abstractmethod
    def write_part(
        self,
        name: str,
        step: int,
        encoded: EncodedCheckpoint,
        sync: bool,
        cancel: threading.Event | None = None,
        direct: bool = False,
    ) -> CommitResult:
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


def check_object_name(name: str) -> str:
    """Validates the name of a `Store.write_object` object."""
    if (
        not isinstance(name, str)
        or not _OBJECT_NAME_RE.match(name)
        or _CHECKPOINT_RE.match(name)
    ):
        raise ValueError(
            "Invalid object name: expected letters, digits, '_', '.' or '-' "
            "(not starting with '.', '_' or '-', at most 128 characters, not "
            f"a checkpoint's name). Received: name={name!r}"
        )
    return name


class LocalStore(Store):
    """A backup directory on a local (or mounted) filesystem.

    Checkpoints are committed by the native extension's atomic rename; the
    lock is an advisory `flock` (see `acquire_lock`).

    Args:
        directory: the backup directory (created when the lock is taken).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self.location = self.directory

    def __repr__(self) -> str:
        return f"LocalStore({self.directory!r})"

    def list_checkpoints(self) -> list[tuple[int, str]]:
        return list_checkpoints(self.directory)

    def commit(
        self,
        step: int,
        encoded: EncodedCheckpoint,
        sync: bool,
        cancel: threading.Event | None = None,
        direct: bool = False,
    ) -> CommitResult:
        return commit(self.directory, step, encoded, sync, cancel=cancel,
                      direct=direct)

    def prune(self, keep: int) -> None:
        prune(self.directory, keep)

    def list_temp_files(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(
            os.path.join(self.directory, n) for n in names
            if _TEMP_RE.match(n)
        )

    def remove_temp_files(self) -> list[str]:
        return remove_temp_files(self.directory)

    def exists(self) -> bool:
        return os.path.exists(self.directory)

    def remove_all(self) -> None:
        remove_backup_dir(self.directory)

    def acquire_lock(self, owner: Any, flush: Callable[[], None]) -> None:
        acquire_lock(self.directory, owner, flush)

    def release_lock(self, owner: Any) -> None:
        release_lock(self.directory, owner)

    def open_checkpoint(self, location: str) -> CheckpointReader:
        return CheckpointReader(location)

    def write_object(self, name: str, data: bytes) -> None:
        check_object_name(name)
        with native.AtomicFile(self.directory, name, sync=True) as f:
            f.write([data], checksum=False)
            f.commit()

    def read_object(self, name: str) -> bytes | None:
        check_object_name(name)
        path = os.path.join(self.directory, name)
        try:
            with open(path, "rb") as f:
                # Bounded, so that a hostile file cannot exhaust memory.
                data = f.read(MAX_OBJECT_BYTES + 1)
        except FileNotFoundError:
            return None
        if len(data) > MAX_OBJECT_BYTES:
            raise ValueError(
                f"{path} is over {MAX_OBJECT_BYTES} bytes: not an object "
                "fastbackup wrote"
            )
        return data

    def write_part(
        self,
        name: str,
        step: int,
        encoded: EncodedCheckpoint,
        sync: bool,
        cancel: threading.Event | None = None,
        direct: bool = False,
    ) -> CommitResult:
        return write_file(self.directory, check_part_name(name), step,
                          encoded, sync, cancel, direct)

    def open_part(self, name: str) -> CheckpointReader:
        return CheckpointReader(
            os.path.join(self.directory, check_part_name(name))
        )

    def list_parts(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if PART_RE.match(n))

    def remove_parts(self, names: list[str]) -> None:
        for name in names:
            try:
                os.unlink(os.path.join(self.directory, check_part_name(name)))
            except FileNotFoundError:
                pass


def check_part_name(name: str) -> str:
    if not PART_RE.match(name):
        raise ValueError(
            "Invalid part name: expected ckpt-<12 digits>.part-<5 digits>-of-"
            f"<5 digits>.fbk. Received: name={name!r}"
        )
    return name


# `scheme:/...`: anything that looks like a URL is one, and is refused unless
# supported, so that "s3://b/p" can never become a local directory "s3:".
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


def is_url(backup_dir: str) -> bool:
    """True if `backup_dir` is a URL (`scheme:/...`), not a local path."""
    return _URL_RE.match(backup_dir) is not None


def open_store(
    backup_dir: str | os.PathLike[str] | Store,
    *,
    lease_seconds: float | None = None,
    retry_seconds: float | None = None,
) -> Store:
    """Returns the store of a backup location.

    Args:
        backup_dir: a local directory, a `file://` URL, an object-store URL
            (`s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/
            prefix`), or a `Store` (returned as is).
        lease_seconds: lifetime of an object store's lock lease. Defaults
            to `FASTBACKUP_LEASE_SECONDS` (60).
        retry_seconds: how long an object store's requests are retried.
            Defaults to `FASTBACKUP_RETRY_SECONDS` (180).

    Raises:
        ValueError: `backup_dir` is a URL of an unsupported scheme, or an
            object-store URL without a bucket.
    """
    if isinstance(backup_dir, Store):
        return backup_dir
    path = os.fspath(backup_dir)
    m = _URL_RE.match(path)
    if m is None:
        return LocalStore(path)
    scheme = m.group(1).lower()
    if scheme == "file":
        if not path.lower().startswith("file:///"):
            raise ValueError(
                "A file URL must be absolute, as file:///path. "
                f"Received: backup_dir={path}"
            )
        return LocalStore(path[len("file://"):])
    from fastbackup import object_store

    if scheme in object_store.SCHEMES:
        return object_store.ObjectStore(
            path, lease_seconds=lease_seconds, retry_seconds=retry_seconds
        )
    raise ValueError(
        f"Unsupported URL scheme {scheme!r} in `backup_dir`: supported are a "
        "local path, file:///path, "
        + ", ".join(f"{s}://" for s in object_store.SCHEMES)
        + f". Received: backup_dir={path}"
    )
