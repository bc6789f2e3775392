"""One part per process: the store of a multi-process job.

In a multi-process JAX job every process snapshots only the shards it
addresses (`snapshot`), and its writer thread stores them as its own part,
durably, through the backup location's store (`write_part`: a local file or
an object). A checkpoint counts only once every part is durable, so the
writer threads agree through JAX's coordination service (`coordination`):

1. each process writes its part, then publishes its name and size (or its
   error);
2. process 0 gathers every process's report (with a deadline), checks they
   all saved the same epoch and batch, and commits a manifest naming the
   parts under the checkpoint's own name (`commit`: an atomic rename, or
   the commit record of an object store), then publishes the outcome;
3. the other processes wait for that outcome, so every writer thread of the
   job succeeds or fails the same checkpoint.

Readers list only manifests, so a part whose checkpoint was never committed
is never read; process 0 deletes such parts at the next `fit`, and the
parts of pruned checkpoints right after a commit. The lock, the clean-up and
the model's config are process 0's; the others learn the lock's outcome
from it, so a second job on the same `backup_dir` is refused in every
process.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fastbackup import format as fmt
from fastbackup.coordination import Coordinator
from fastbackup.errors import BackupDirLockedError, PeerError
from fastbackup.format import CheckpointReader, EncodedCheckpoint
from fastbackup.stores.base import (
    CommitResult,
    LocationStore,
    Store,
    WriteCancelled,
)
from fastbackup.stores.names import part_name, part_step

log = logging.getLogger("fastbackup")


class ProcessParts(Store):
    """The backup of one process of a multi-process job.

    Args:
        inner: the store of the backup location, shared by every process
            (a shared filesystem or a bucket).
        coordinator: the job's view of JAX's coordination service.
    """

    def __init__(self, inner: LocationStore, coordinator: Coordinator) -> None:
        self.inner = inner
        self.coordinator = coordinator
        self.location = inner.location
        self._before: list[int] = []

    def __repr__(self) -> str:
        c = self.coordinator
        return f"ProcessParts({self.inner!r}, process {c.index} of {c.count})"

    # Writing ------------------------------------------------------------

    def commit(self, step: int, encoded: EncodedCheckpoint, sync: bool,
               cancel: threading.Event | None = None,
               direct: bool = False) -> CommitResult:
        """Writes this process's part, then commits or awaits the commit.

        Raises:
            OSError: this part, another process's part or the manifest
                failed (`PeerError` for another process); the checkpoint is
                not committed and earlier ones stay.
            WriteCancelled: `cancel` was set.
        """
        c = self.coordinator
        key = f"step/{step}"
        name = part_name(step, c.index, c.count)
        start = time.perf_counter()
        try:
            result = self.inner.write_part(name, step, encoded, sync,
                                           cancel=cancel, direct=direct)
        except BaseException as e:
            # The others must not wait for this part until their deadline.
            c.publish_mine(f"{key}/part", _failure(e))
            if c.is_primary:
                c.publish(f"{key}/commit", _failure(e))
            raise
        c.publish_mine(f"{key}/part", {
            "name": name, "size": result.nbytes,
            "epoch": encoded.meta["epoch"], "batch": encoded.meta["batch"],
        })
        if c.is_primary:
            self._commit_manifest(step, encoded, sync, cancel)
        else:
            outcome = c.wait(f"{key}/commit", f"process 0's commit of step "
                             f"{step}", cancel, WriteCancelled)
            if outcome.get("cancelled"):
                # Abandoned by process 0, as by this one: not an error.
                raise WriteCancelled(name)
            if "error" in outcome:
                raise PeerError(
                    errno.EIO, f"checkpoint step {step} was not committed: "
                    f"{outcome['error']}", self.location,
                )
        return CommitResult(result.path, step, result.nbytes,
                            time.perf_counter() - start)

    def _commit_manifest(
        self, step: int, encoded: EncodedCheckpoint, sync: bool,
        cancel: threading.Event | None,
    ) -> None:
        c = self.coordinator
        key = f"step/{step}"
        try:
            reports = c.gather(f"{key}/part", f"the parts of step {step}",
                               cancel, WriteCancelled)
            if any(r.get("cancelled") for r in reports):
                raise WriteCancelled(part_name(step, c.index, c.count))
            failed = [(i, r["error"]) for i, r in enumerate(reports)
                      if "error" in r]
            if failed:
                raise PeerError(
                    errno.EIO, f"checkpoint step {step} is not committed: "
                    + "; ".join(f"process {i}: {e}" for i, e in failed),
                    self.location,
                )
            positions = {(r["epoch"], r["batch"]) for r in reports}
            if len(positions) != 1:
                # Saves are taken at the same batches in every process; a
                # mismatch would mix two training steps in one checkpoint.
                raise PeerError(
                    errno.EIO, f"the processes saved different steps as "
                    f"checkpoint {step}: (epoch, batch) "
                    f"{[(r['epoch'], r['batch']) for r in reports]}",
                    self.location,
                )
            manifest = fmt.encode_manifest(encoded.meta, reports)
            # The checkpoints before this one: `prune` deletes the parts of
            # those it drops by name, without listing the location.
            self._before = [s for s, _ in self.inner.list_checkpoints()]
            self.inner.commit(step, manifest, sync, cancel=cancel)
        except BaseException as e:
            c.publish(f"{key}/commit", _failure(e))
            raise
        c.publish(f"{key}/commit", {"ok": True})
        # Every process has reported step `step`, so none waits on the keys
        # of the step before any more.
        c.forget(f"step/{step - 1}")

    def prune(self, keep: int) -> None:
        if not self.coordinator.is_primary:
            return
        self.inner.prune(keep)
        kept = {s for s, _ in self.inner.list_checkpoints()}
        before, self._before = self._before, []
        count = self.coordinator.count
        # Parts of another process count (an earlier job) or of a commit
        # that failed go at the next fit's clean-up.
        self.inner.remove_parts([
            part_name(s, i, count) for s in before if s not in kept
            for i in range(count)
        ])

    # Clean-up, lock ---------------------------------------------------------

    def _uncommitted_parts(self) -> list[str]:
        committed = {s for s, _ in self.inner.list_checkpoints()}
        return [n for n in self.inner.list_parts()
                if part_step(n) not in committed]

    def list_temp_files(self) -> list[str]:
        return self.inner.list_temp_files() + self._uncommitted_parts()

    def remove_temp_files(self) -> list[str]:
        """Process 0 removes what interrupted writes left; the others wait.

        Called under the lock at the start of a fit, before any process
        writes: waiting here keeps a fast process's first part from being
        taken for a leftover.
        """
        c = self.coordinator
        if not c.is_primary:
            outcome = c.wait("clean", "process 0's clean-up")
            if "error" in outcome:
                raise PeerError(errno.EIO, outcome["error"], self.location)
            return []
        try:
            removed = self.inner.remove_temp_files()
            parts = self._uncommitted_parts()
            self.inner.remove_parts(parts)
        except BaseException as e:
            c.publish("clean", {"error": f"process 0's clean-up failed: "
                                         f"{_describe(e)}"})
            raise
        c.publish("clean", {"ok": True})
        if parts:
            log.info("removed %d part(s) of uncommitted checkpoints in %s",
                     len(parts), self.location)
        return removed + parts

    def acquire_lock(self, owner: Any, flush: Callable[[], None]) -> None:
        """Process 0 takes the backup's lock for the job; the others wait.

        Raises:
            BackupDirLockedError: in every process, when another job (or
                another callback) holds the lock.
            PeerError: process 0 did not answer in time.
        """
        c = self.coordinator
        if not c.is_primary:
            outcome = c.wait("lock", "process 0's lock of the backup")
            if "error" in outcome:
                raise BackupDirLockedError(errno.EBUSY, outcome["error"],
                                           self.location)
            return
        try:
            self.inner.acquire_lock(owner, flush)
        except BaseException as e:
            c.publish("lock", {"error": f"process 0 could not lock the "
                                        f"backup: {_describe(e)}"})
            raise
        c.publish("lock", {"ok": True})

    def release_lock(self, owner: Any) -> None:
        if self.coordinator.is_primary:
            self.inner.release_lock(owner)

    def remove_all(self) -> None:
        if self.coordinator.is_primary:
            self.inner.remove_all()

    def write_object(self, name: str, data: bytes) -> None:
        if self.coordinator.is_primary:
            self.inner.write_object(name, data)

    # Reading: the location's own ---------------------------------------------

    def list_checkpoints(self) -> list[tuple[int, str]]:
        return self.inner.list_checkpoints()

    def open_checkpoint(self, location: str) -> CheckpointReader:
        return self.inner.open_checkpoint(location)

    def exists(self) -> bool:
        return self.inner.exists()

    def read_object(self, name: str) -> bytes | None:
        return self.inner.read_object(name)

    def end_fit(self, after_cleanup: bool = False) -> None:
        """Waits until every process has reached the same point of `fit`'s end.

        Called twice: once every process's writes are done, so that process
        0 may delete the backup or release the lock without pulling files
        from under a process still writing; then once that is done, so
        that `fit` returns everywhere with the backup in its final state.

        Args:
            after_cleanup: the second call.

        Raises:
            PeerError: a process did not arrive in time, or died.
        """
        key = "cleaned-up" if after_cleanup else "end"
        self.coordinator.agree(key, True, f"the end of fit ({key})")


def _describe(e: BaseException) -> str:
    if isinstance(e, WriteCancelled):
        return "the write was abandoned"
    # An OSError's file is the shared backup's: the message says the rest.
    detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"{type(e).__name__}: {detail}"


def _failure(e: BaseException) -> dict[str, Any]:
    """What a process publishes when its part of a checkpoint failed."""
    return {"error": _describe(e), "cancelled": isinstance(e, WriteCancelled)}
