"""The background writer: one named thread that makes snapshots durable.

The training thread checks a host buffer out of a small pool, fills it (see
`snapshot`) and submits it; the writer thread encodes it (`format`) and
commits it (`stores`), then returns the buffer to the pool. The pool holds
one or two buffers (`pool_size`), so host memory is bounded whatever the
disk's speed. With two, a due save always finds a buffer: the free one, or
the one whose snapshot still waits, which the newer state replaces. With
one, when it is busy the training thread either waits or, by default, does
not save now (the callback retries at the next step boundary: saves are
coalesced, never queued without bound).

An exception on the writer thread is kept and re-raised on the training
thread (`check_error`, `wait_until_finished`), never swallowed. The thread is
a daemon, and an `atexit` hook flushes every writer: a non-daemon thread
blocked on its queue would hang interpreter exit (CPython joins non-daemon
threads before running `atexit` handlers).
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import errno
import logging
import os
import statistics
import threading
import time
import weakref

from fastbackup import format as fmt
from fastbackup.errors import BackupWriteError
from fastbackup.snapshot import HostSnapshot, TensorSpec
from fastbackup.stores.base import Store, WriteCancelled
from fastbackup.stores.location import open_store

log = logging.getLogger("fastbackup")

# A slot is FREE (buffers idle, or not allocated yet), FILLING (the training
# thread copies into it), QUEUED (waits to be written), PREPARING (waits for
# the writer thread to allocate and fault in its buffers) or BUSY (the writer
# thread works on it).
_FREE, _FILLING, _QUEUED, _PREPARING, _BUSY = (
    "free", "filling", "queued", "preparing", "busy",
)


# States up to this size get a second host buffer unless the user chose
# (`FASTBACKUP_PENDING_SNAPSHOTS`): every due save is then snapshotted at
# once, as Keras's synchronous callback saves it, instead of being coalesced
# into a later step that may never come (an exception right after a save).
# The second buffer costs at most this much memory (0.3% of a 24 GiB
# machine), faulted in on the writer thread in 7-36 ms (measured here with
# `HostSnapshot.allocate`); above it, doubling the state's host memory is a
# real cost and coalescing stays (docs/configuration.md).
AUTO_SECOND_BUFFER_BYTES = 64 << 20


def pool_size(pending_snapshots: int | None, state_bytes: int) -> int:
    """Host buffers for a state of `state_bytes`.

    Args:
        pending_snapshots: `FASTBACKUP_PENDING_SNAPSHOTS`: 0, 1, or `None`
            for automatic.
        state_bytes: size of one host copy of the state.

    Returns:
        1 or 2.
    """
    if pending_snapshots is None:
        return 2 if state_bytes <= AUTO_SECOND_BUFFER_BYTES else 1
    return 1 + pending_snapshots


@dataclasses.dataclass
class WriterStats:
    """Counters of one writer, for the summary and the benchmarks.

    Attributes:
        saves: checkpoints made durable.
        coalesced: due saves merged into a later one because the writer
            was busy.
        bytes_written: bytes written to checkpoint files.
        raw_bytes: uncompressed state bytes of those checkpoints.
        write_seconds: duration of each durable write (encode + commit +
            pruning of older checkpoints).
        last_durable: `(step, epoch, batch)` of the newest durable checkpoint.
    """

    saves: int = 0
    coalesced: int = 0
    bytes_written: int = 0
    raw_bytes: int = 0
    write_seconds: list[float] = dataclasses.field(default_factory=list)
    last_durable: tuple[int, int, int] | None = None

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.bytes_written if self.bytes_written else 1.0

    def summary(self, blocking_seconds: list[float], kept_in: str | None) -> str:
        """One line for the end of a verbose `fit`.

        Args:
            blocking_seconds: how long each save of this `fit` held the
                training thread.
            kept_in: the backup location when the backup is kept, `None`
                when it was deleted at the end of `fit`: the line then
                names no checkpoint, as none is left.
        """
        parts = [(
            f"fastbackup: {self.saves} checkpoint(s) written "
            f"({_decimal_size(self.bytes_written)})"
        )]
        if blocking_seconds:
            parts.append(
                "training paused "
                f"{statistics.median(blocking_seconds) * 1e3:.1f} ms per save "
                "(median)"
            )
        if self.coalesced:
            # Not a loss: the state of a later step is saved instead.
            parts.append(
                f"{self.coalesced} due save(s) taken at a later step, "
                "the writer being busy"
            )
        if kept_in is None:
            parts.append("backup deleted at the end of training "
                         "(delete_checkpoint=True)")
        elif self.last_durable is not None:
            step, epoch, batch = self.last_durable
            parts.append(f"newest checkpoint: step {step} (epoch {epoch}, "
                         f"batch {batch}) in {kept_in}")
        return "; ".join(parts)

    @property
    def throughput(self) -> float:
        """Bytes per second of the durable writes, 0 before the first."""
        total = sum(self.write_seconds)
        return self.bytes_written / total if total else 0.0


def _decimal_size(nbytes: int) -> str:
    """`nbytes` as "512 B", "3.1 kB", "1.2 MB", "4.0 GB"."""
    if nbytes < 1000:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


class Slot:
    """A reusable host buffer and its state in the pool."""

    __slots__ = ("snapshot", "state", "specs")

    def __init__(self) -> None:
        self.snapshot: HostSnapshot | None = None
        self.state = _FREE
        self.specs: list[TensorSpec] | None = None


class BackgroundWriter:
    """Owns the host-buffer pool and the writer thread of one callback.

    Args:
        location: where checkpoints go: a store (one process's
            `ProcessParts` in a multi-process job), or a path or URL for
            `stores.location.open_store`.
        policy: per-tensor compression decisions.
        keep: checkpoints to keep (2 with `double_checkpoint`).
        sync: fsync file and directory (off only for tmpfs benchmarks).
        buffers: size of the host-buffer pool (1 or 2).
        direct: write with O_DIRECT, bypassing the page cache.
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | Store,
        policy: fmt.CompressionPolicy,
        keep: int,
        sync: bool = True,
        buffers: int = 1,
        direct: bool = False,
    ) -> None:
        self.store = (
            location if isinstance(location, Store) else open_store(location)
        )
        self.policy = policy
        self.keep = keep
        self.sync = sync
        self.direct = direct
        self.stats = WriterStats()
        self.next_step = 0
        self._slots = [Slot() for _ in range(buffers)]
        self._queue: collections.deque[Slot] = collections.deque()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        _live_writers.add(self)

    # Training-thread side -------------------------------------------------

    def checkout(self, block: bool) -> Slot | None:
        """Takes a buffer to fill.

        Args:
            block: wait until a buffer is free; every submitted snapshot is
                then written. Otherwise a snapshot still waiting in the
                queue is taken back and replaced by the newer state.

        Returns:
            The slot, or `None` when busy and `block` is false.
        """
        with self._cond:
            while True:
                for slot in self._slots:
                    if slot.state == _FREE:
                        slot.state = _FILLING
                        return slot
                if block:
                    self._cond.wait()
                    continue
                waiting = [s for s in self._queue if s.state == _QUEUED]
                if not waiting:
                    return None
                # The newest state replaces a snapshot still waiting.
                slot = waiting[-1]
                self._queue.remove(slot)
                slot.state = _FILLING
                self.stats.coalesced += 1
                log.debug("coalesced a pending snapshot (%d so far)",
                          self.stats.coalesced)
                return slot

    def resize(self, buffers: int) -> None:
        """Sets the number of host buffers (1 or 2).

        A new buffer is allocated when first used (or by `prepare`); a
        surplus one is dropped once it is free, never while it holds a
        snapshot that waits or is being written.
        """
        with self._cond:
            while len(self._slots) < buffers:
                self._slots.append(Slot())
            for slot in [s for s in self._slots if s.state == _FREE]:
                if len(self._slots) <= buffers:
                    break
                self._slots.remove(slot)

    @property
    def buffers(self) -> int:
        """Number of host buffers in the pool."""
        return len(self._slots)

    def prepare(self, specs: list[TensorSpec]) -> None:
        """Allocates the host buffers on the writer thread, ahead of need.

        Fresh memory is slow to fault in (0.5 GB/s on this class of VM, so
        seconds for a large model): done on the training thread it would
        stall the first save; done here it overlaps with training. A save
        due before it finishes is coalesced (or waits, when blocking).

        Args:
            specs: the layout of the state, as the snapshotter will copy it.
        """
        with self._cond:
            for slot in self._slots:
                fits = slot.snapshot is not None and [
                    (s.shape, s.dtype) for s in slot.snapshot.specs
                ] == [(s.shape, s.dtype) for s in specs]
                if slot.state == _FREE and not fits:
                    slot.snapshot = None
                    slot.specs = specs
                    slot.state = _PREPARING
                    self._queue.appendleft(slot)
            self._start_thread()
            self._cond.notify_all()

    def cancel(self, slot: Slot) -> None:
        """Returns a checked-out slot unused (its snapshot failed)."""
        with self._cond:
            slot.state = _FREE
            self._cond.notify_all()

    def submit(self, slot: Slot, snapshot: HostSnapshot) -> None:
        """Queues a filled buffer for writing."""
        with self._cond:
            slot.snapshot = snapshot
            slot.state = _QUEUED
            self._queue.appendleft(slot)
            self._start_thread()
            self._cond.notify_all()

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name="fastbackup-writer", daemon=True
            )
            self._thread.start()

    def _pending(self) -> bool:
        return any(s.state in (_QUEUED, _PREPARING, _BUSY) for s in self._slots)

    def busy(self) -> bool:
        """True while a snapshot is queued or being written."""
        with self._cond:
            return self._pending()

    def abandon(self) -> None:
        """Drops queued snapshots and aborts the write in flight.

        For a backup that is about to be deleted: waiting for its
        durability (seconds for a large model) would be wasted. The temporary
        file (or upload) of an aborted write is removed; earlier checkpoints are kept.
        """
        with self._cond:
            for slot in list(self._queue):
                if slot.state == _PREPARING:
                    slot.specs = None
                slot.state = _FREE
            self._queue.clear()
            self._cancel.set()
            self._cond.notify_all()
            while self._pending():
                self._cond.wait()
            self._cancel.clear()

    def check_error(self) -> BaseException | None:
        """Pops the writer's stored exception, if any."""
        with self._cond:
            error, self._error = self._error, None
        return error

    def raise_error(self, warn_only: bool = False) -> None:
        """Raises the writer's stored error on the training thread.

        Args:
            warn_only: log it instead (`FASTBACKUP_ON_ERROR=warn`): training
                goes on without that checkpoint.

        Raises:
            BackupWriteError: a write failed since the last check.
        """
        error = self.check_error()
        if error is None:
            return
        if warn_only:
            log.warning("fastbackup: a checkpoint write failed; training "
                        "goes on (FASTBACKUP_ON_ERROR=warn): %s", error)
            return
        raise as_write_error(error)

    def wait_until_finished(self, raise_errors: bool = True) -> None:
        """Blocks until every submitted snapshot is durable or has failed.

        Args:
            raise_errors: raise the writer's stored error as
                `BackupWriteError` (otherwise it stays stored).

        Raises:
            BackupWriteError: a write failed since the last check.
        """
        with self._cond:
            while self._pending():
                self._cond.wait()
        if raise_errors:
            self.raise_error()

    def close(self) -> None:
        """Flushes, then stops the thread; buffers are released."""
        self.wait_until_finished(raise_errors=False)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        for slot in self._slots:
            slot.snapshot = None

    # Writer-thread side ---------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                slot = self._queue.pop()
                preparing = slot.state == _PREPARING
                slot.state = _BUSY
                if not preparing:
                    step = self.next_step
                    self.next_step += 1
            try:
                if preparing:
                    slot.snapshot = HostSnapshot.allocate(slot.specs or [])
                    slot.specs = None
                else:
                    self._write(slot.snapshot, step)  # type: ignore[arg-type]
            except WriteCancelled:
                log.debug("write of step %d abandoned", step)
            except BaseException as e:  # kept for the training thread
                log.debug("background work failed: %r", e)
                with self._cond:
                    self._error = e
            finally:
                with self._cond:
                    slot.state = _FREE
                    self._cond.notify_all()

    def _write(self, snapshot: HostSnapshot, step: int) -> None:
        start = time.perf_counter()
        encoded = fmt.encode(snapshot, self.policy, step)
        result = self.store.commit(
            step, encoded, self.sync, cancel=self._cancel, direct=self.direct,
        )
        # Older checkpoints go only once the new one is durable.
        self.store.prune(self.keep)
        self.policy.observe_write(result.nbytes, result.seconds)
        with self._cond:
            s = self.stats
            s.saves += 1
            s.bytes_written += result.nbytes
            s.raw_bytes += snapshot.nbytes
            s.write_seconds.append(time.perf_counter() - start)
            s.last_durable = (step, snapshot.epoch, snapshot.batch)
        log.debug("checkpoint %s durable: %d bytes in %.3f s", result.path,
                  result.nbytes, result.seconds)


def as_write_error(error: BaseException) -> BackupWriteError:
    """Wraps a writer-thread exception for raising on the training thread."""
    if isinstance(error, BackupWriteError):
        return error
    detail = str(error) or type(error).__name__
    err = BackupWriteError(
        getattr(error, "errno", None) or 0,
        f"background checkpoint write failed: {detail}",
        getattr(error, "filename", None),
    )
    err.__cause__ = error
    return err


_live_writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


def _location_removed(writer: BackgroundWriter, error: BaseException) -> bool:
    """True if `error` is only the backup location having been removed.

    A backup directory deleted on purpose while a write was pending (a
    test's temporary directory cleaned up after an exception) fails that
    write with ENOENT; there is nothing left to report.
    """
    cause: BaseException | None = error
    while cause is not None and getattr(cause, "errno", None) != errno.ENOENT:
        cause = cause.__cause__
    if cause is None:
        return False
    try:
        return not writer.store.exists()
    except OSError:
        return False


@atexit.register
def _flush_at_exit() -> None:
    for writer in list(_live_writers):
        writer.wait_until_finished(raise_errors=False)
        error = writer.check_error()
        if error is not None and _location_removed(writer, error):
            log.debug("the last checkpoint write failed at exit, its backup "
                      "location %s having been removed: %s",
                      writer.store.location, error)
        elif error is not None:
            log.error("fastbackup: the last checkpoint write failed at exit: "
                      "%s", error)
        writer.close()
