"""A backup in a directory of a local (or mounted) filesystem.

The directory holds the checkpoints and parts (`stores.names`), the small
named objects, a lock file (`LOCK_NAME`) and, while a write is in flight,
its temporary file. A checkpoint is created under a temporary name and
renamed into place by the native extension (`write_file`, the one byte
primitive here); older checkpoints are removed only after the new one is
durable, so a crash at any instant leaves at least one complete checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from fastbackup._compat import native
from fastbackup.errors import BackupDirLockedError
from fastbackup.format import CheckpointReader, EncodedCheckpoint
from fastbackup.stores import locks
from fastbackup.stores.base import CommitResult, LocationStore, WriteCancelled
from fastbackup.stores.names import (
    CHECKPOINT_RE,
    MAX_OBJECT_BYTES,
    PART_RE,
    check_object_name,
    check_part_name,
    checkpoint_name,
)

log = logging.getLogger("fastbackup")

LOCK_NAME = ".fastbackup.lock"
# Temporary files of checkpoints and of `write_object`'s small objects.
TEMP_RE = re.compile(
    r"^\.(ckpt-[0-9]{12}\.fbk|[A-Za-z0-9][A-Za-z0-9_.-]{0,127})"
    r"\.[0-9a-f]{16}\.tmp$"
)

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


def _write_group(
    f: Any, group: list[Any], known: list[int | None]
) -> list[int]:
    """Writes `group`, checksumming only the segments of unknown CRC.

    Returns:
        Each segment's CRC-32C: the known one, or the one computed while it
        was written.
    """
    crcs: list[int] = []
    start = 0
    while start < len(group):
        # Runs of segments alike in whether their CRC is known, one write()
        # call each.
        skip = known[start] is not None
        end = start + 1
        while end < len(group) and (known[end] is not None) == skip:
            end += 1
        if skip:
            f.write(group[start:end], checksum=False)
            crcs.extend(known[start:end])  # type: ignore[arg-type]
        else:
            crcs.extend(f.write(group[start:end]))
        start = end
    return crcs


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
        first = 0
        for group in _groups(encoded.segments):
            if cancel is not None and cancel.is_set():
                raise WriteCancelled(name)
            known = encoded.known_crcs[first : first + len(group)]
            crcs.extend(_write_group(f, group, known))
            first += len(group)
        f.write([encoded.trailer(crcs)], checksum=False)
        if cancel is not None and cancel.is_set():
            raise WriteCancelled(name)
        nbytes = f.bytes_written
        f.commit()
    return CommitResult(
        os.path.join(directory, name), step, nbytes,
        time.perf_counter() - start,
    )


class LocalStore(LocationStore):
    """A backup directory on a local (or mounted) filesystem.

    Checkpoints are committed by the native extension's atomic rename; the
    lock is an advisory `flock` on `LOCK_NAME` holding the holder's pid
    (see `acquire_lock`).

    Args:
        directory: the backup directory (created when the lock is taken).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self.location = self.directory

    def __repr__(self) -> str:
        return f"LocalStore({self.directory!r})"

    def _names(self) -> list[str]:
        try:
            return os.listdir(self.directory)
        except FileNotFoundError:
            return []

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass

    # Lock ---------------------------------------------------------------------

    def _lock_key(self) -> str:
        return os.path.realpath(self.directory)

    def acquire_lock(self, owner: Any, flush: Callable[[], None]) -> None:
        """Takes the directory's advisory lock for `owner` (a callback).

        Across processes, `flock` makes the second user fail; inside one
        process the rules of `stores.locks` apply. A lock whose file was
        removed with its directory guards nothing: a new one is taken.

        Raises:
            BackupDirLockedError: another process, or a callback training on
                another thread, uses the directory.
        """
        locks.acquire(
            self._lock_key(), owner, flush, self.directory,
            valid=self._is_lock_file, discard=os.close, take=self._flock,
        )

    def _is_lock_file(self, fd: int) -> bool:
        """True if `fd` is still the lock file of the directory."""
        try:
            st = os.stat(os.path.join(self.directory, LOCK_NAME))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return os.path.samestat(st, os.fstat(fd))

    def _flock(self) -> int:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, LOCK_NAME)
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
                self.directory,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def release_lock(self, owner: Any) -> None:
        fd = locks.release(self._lock_key(), owner)
        if fd is not None:
            os.close(fd)

    # Clean-up -------------------------------------------------------------

    def list_temp_files(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(
            os.path.join(self.directory, n) for n in names if TEMP_RE.match(n)
        )

    def remove_temp_files(self) -> list[str]:
        """Removes temporary files left by writers that were killed mid-write.

        Only call this while holding the directory's lock: a live writer's
        temp file looks the same.
        """
        removed = []
        for name in self._names():
            if not TEMP_RE.match(name):
                continue
            path = os.path.join(self.directory, name)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted "
                     "write in %s", len(removed), self.directory)
        return removed

    def exists(self) -> bool:
        return os.path.exists(self.directory)

    def remove_all(self) -> None:
        """Deletes the whole backup directory, as Keras does after `fit`."""
        shutil.rmtree(self.directory, ignore_errors=False)

    # Checkpoints ----------------------------------------------------------

    def list_checkpoints(self) -> list[tuple[int, str]]:
        found = []
        for name in self._names():
            m = CHECKPOINT_RE.match(name)
            if m:
                found.append((int(m.group(1)),
                              os.path.join(self.directory, name)))
        return sorted(found, reverse=True)

    def open_checkpoint(self, location: str) -> CheckpointReader:
        return CheckpointReader(location)

    def commit(self, step: int, encoded: EncodedCheckpoint, sync: bool,
               cancel: threading.Event | None = None,
               direct: bool = False) -> CommitResult:
        """Writes one checkpoint durably and atomically (see `write_file`)."""
        return write_file(self.directory, checkpoint_name(step), step,
                          encoded, sync, cancel, direct)

    def prune(self, keep: int) -> None:
        for _, path in self.list_checkpoints()[keep:]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # Small named objects ------------------------------------------------------

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

    # Parts --------------------------------------------------------------------

    def write_part(self, name: str, step: int, encoded: EncodedCheckpoint,
                   sync: bool, cancel: threading.Event | None = None,
                   direct: bool = False) -> CommitResult:
        return write_file(self.directory, check_part_name(name), step,
                          encoded, sync, cancel, direct)

    def open_part(self, name: str) -> CheckpointReader:
        return CheckpointReader(
            os.path.join(self.directory, check_part_name(name))
        )

    def list_parts(self) -> list[str]:
        return sorted(n for n in self._names() if PART_RE.match(n))

    def remove_parts(self, names: list[str]) -> None:
        for name in names:
            self._unlink(check_part_name(name))
