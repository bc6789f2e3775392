"""The backup directory: naming, locking, atomic commit, listing, pruning.

A backup directory holds checkpoints named `ckpt-<step>.fbk`, where `step` is
a sequence number that only grows, a lock file, and the model's config
(`model_config`), written once per fit. A checkpoint is created
under a temporary name and renamed into place by the native extension; older
checkpoints are removed only after the new one is durable, so a crash at any
instant leaves at least one complete checkpoint.
"""

from __future__ import annotations

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
from fastbackup.format import EncodedCheckpoint

log = logging.getLogger("fastbackup")

_CHECKPOINT_RE = re.compile(r"^ckpt-([0-9]{12})\.fbk$")
MODEL_CONFIG_NAME = "model-config.json"
_TEMP_RE = re.compile(
    r"^\.(ckpt-[0-9]{12}\.fbk|model-config\.json)\.[0-9a-f]+\.tmp$"
)
LOCK_NAME = ".fastbackup.lock"


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint with sequence number `step`."""
    return f"ckpt-{step:012d}.fbk"


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
    """Writes one checkpoint durably and atomically.

    The payload is streamed from the snapshot's buffers with its checksums
    computed in the same pass; the header and footer follow; then the
    native extension fsyncs, renames and fsyncs the directory, all with the
    GIL released.

    Args:
        directory: the backup directory.
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
    name = checkpoint_name(step)
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


def write_model_config(directory: str, data: bytes, sync: bool) -> None:
    """Replaces the model config file, durably and atomically."""
    with native.AtomicFile(directory, MODEL_CONFIG_NAME, sync=sync) as f:
        f.write([data], checksum=False)
        f.commit()


def read_model_config(directory: str) -> bytes | None:
    """The model config file's contents, or `None` when there is none."""
    try:
        with open(os.path.join(directory, MODEL_CONFIG_NAME), "rb") as f:
            # A few KiB in practice; bounded so a hostile file cannot
            # exhaust memory.
            data = f.read(_MAX_MODEL_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > _MAX_MODEL_CONFIG_BYTES:
        raise ValueError(
            f"{os.path.join(directory, MODEL_CONFIG_NAME)} is over "
            f"{_MAX_MODEL_CONFIG_BYTES} bytes: not a model config"
        )
    return data


_MAX_MODEL_CONFIG_BYTES = 64 << 20


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
            previous = held.owner()
            if previous is owner:
                held.thread = threading.get_ident()
            elif previous is not None and held.thread != threading.get_ident():
                raise BackupDirLockedError(
                    errno.EBUSY,
                    "backup_dir is in use by another BackupAndRestore "
                    "callback training in this process",
                    directory,
                )
            else:
                held.flush()
                held.owner = weakref.ref(owner)
                held.flush = flush
                held.thread = threading.get_ident()
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


def release_lock(directory: str, owner: Any) -> None:
    """Releases the lock if `owner` holds it."""
    key = os.path.realpath(directory)
    with _held_lock:
        held = _held.get(key)
        if held is None or held.owner() not in (owner, None):
            return
        del _held[key]
        os.close(held.fd)
