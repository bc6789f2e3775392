"""This process's one registry of the backups it holds locked.

Every store locks its location against other jobs in its own way (an
advisory `flock` on a directory's lock file, a lease object in a bucket).
Inside one process the rules are the same for all, and live here: a
callback keeps the lock it holds, or takes it over from another callback
only when that one cannot be training concurrently: it was
garbage-collected, or its last `fit` ran on this same thread (a `fit`
interrupted by an exception never calls `on_train_end`, so its callback
still holds the lock; rerunning `fit` with a new callback is the documented
way to resume). The previous owner's pending writes are flushed first.
"""

from __future__ import annotations

import errno
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from fastbackup.errors import BackupDirLockedError

Handle = TypeVar("Handle")


class Hold(Generic[Handle]):
    """One backup this process holds locked.

    Attributes:
        handle: what keeps the location locked (a file descriptor, a lease).
        owner: weak reference to the callback holding it.
        flush: waits until the owner's pending writes are done. Strong: a
            collected callback's writer thread may still be writing.
        thread: the thread of the owner's last `fit`.
    """

    def __init__(self, handle: Handle, owner: Any, flush: Callable[[], None]) -> None:
        self.handle = handle
        self.owner = weakref.ref(owner)
        self.flush = flush
        self.thread = threading.get_ident()


# Keyed by location: a directory's real path, or a bucket URL.
_holds: dict[str, Hold[Any]] = {}
_holds_lock = threading.Lock()


def held(key: str) -> Hold[Any] | None:
    """The hold on `key`, or `None` if this process holds no lock on it."""
    with _holds_lock:
        return _holds.get(key)


def acquire(
    key: str,
    owner: Any,
    flush: Callable[[], None],
    location: str,
    *,
    valid: Callable[[Handle], bool],
    discard: Callable[[Handle], None],
    take: Callable[[], Handle],
) -> None:
    """Takes the lock of `key` for `owner`, within and across processes.

    Args:
        key: the location's key in the registry.
        owner: the callback taking the lock (held by weak reference).
        flush: waits until `owner`'s pending writes are done.
        location: the backup location, for the error.
        valid: tells whether a handle this process holds still locks the
            location (a removed directory's lock file, a lost lease: not).
        discard: lets go of a handle that no longer locks anything.
        take: locks the location against other processes and returns the
            handle; raises `BackupDirLockedError` when another job holds it.
            Called with the registry locked, so that two callbacks of this
            process never race for one location.

    Raises:
        BackupDirLockedError: another job, or a callback training on another
            thread of this process, holds the lock.
    """
    with _holds_lock:
        hold = _holds.get(key)
        if hold is not None:
            _claim(hold, owner, flush, location)
            if valid(hold.handle):
                return
            del _holds[key]
            discard(hold.handle)
        _holds[key] = Hold(take(), owner, flush)


def release(key: str, owner: Any) -> Any:
    """Forgets the lock of `key` if `owner` (or a collected owner) holds it.

    Returns:
        The handle, for the store to unlock, or `None` if `owner` held
        nothing.
    """
    with _holds_lock:
        hold = _holds.get(key)
        if hold is None or hold.owner() not in (owner, None):
            return None
        del _holds[key]
        return hold.handle


def _claim(
    hold: Hold[Any], owner: Any, flush: Callable[[], None], location: str
) -> None:
    """Applies the in-process rules (see the module docstring) to `hold`."""
    previous = hold.owner()
    if previous is owner:
        hold.thread = threading.get_ident()
    elif previous is not None and hold.thread != threading.get_ident():
        raise BackupDirLockedError(
            errno.EBUSY,
            "backup_dir is in use by another BackupAndRestore "
            "callback training in this process",
            location,
        )
    else:
        hold.flush()
        hold.owner = weakref.ref(owner)
        hold.flush = flush
        hold.thread = threading.get_ident()
