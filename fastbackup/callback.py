"""`BackupAndRestore`: the Keras callback users put in `model.fit`.

The callback holds the Keras hooks and decides when to save; the work is
delegated: `snapshot` copies the state on the training thread, `writer`
makes it durable on its own thread through a `stores` store, `overlap`
gates the optimizer's update while a copy runs behind the step, `restore`
loads the newest checkpoint, `resume` skips the batches a mid-epoch resume
has already trained, and `preemption` decides where SIGTERM stops training.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any

import keras

from fastbackup import backend, coordination, model_config, overlap, restore
from fastbackup import config as config_lib
from fastbackup import format as fmt
from fastbackup import resume as resume_lib
from fastbackup import writer as writer_lib
from fastbackup.preemption import SigtermPolicy
from fastbackup.resume import MidEpochResume
from fastbackup.snapshot import Snapshotter
from fastbackup.stores.base import Store
from fastbackup.stores.location import open_store
from fastbackup.stores.parts import ProcessParts
from fastbackup.writer import BackgroundWriter, WriterStats

log = logging.getLogger("fastbackup")


def _check_save_freq(save_freq: Any) -> None:
    """Accepts what Keras accepts, but a negative integer.

    Keras takes any `int` (a `bool` is one): 0 and `True` save after every
    batch there (`count >= 0`, `count >= 1`), and so they do here; a
    frequency computed as `steps // k` that rounds to 0 on a small dataset
    keeps working. A negative count has no meaning as a frequency: it is a
    sentinel ("off") or a bug, and Keras silently saves after every batch,
    the opposite of "off"; it is refused (docs/migrating.md). `False` means
    no periodic saves, as Keras documents (Keras saves after every batch).
    """
    if save_freq != "epoch" and not isinstance(save_freq, int):
        raise ValueError(
            "Invalid value for argument `save_freq`. "
            f"Received: save_freq={save_freq}. "
            "Expected either 'epoch' or an integer value."
        )
    if save_freq is not False and isinstance(save_freq, int) and save_freq < 0:
        raise ValueError(
            "Invalid value for argument `save_freq`. "
            f"Received: save_freq={save_freq}. A negative number of batches "
            "is not a frequency: use False for no periodic saves, or 1 to "
            "save after every batch."
        )


class BackupAndRestore(keras.callbacks.Callback):
    """Callback to back up and restore the training state, asynchronously.

    A drop-in replacement for `keras.callbacks.BackupAndRestore`: same
    arguments, same files-on-interruption behaviour, same resume semantics.
    A save costs the training step only a copy of the state into reused host
    memory; a background thread encodes it, checksums it and writes it
    durably (temporary file, fsync, atomic rename, directory fsync), so a
    crash at any instant leaves a complete checkpoint whose weights,
    optimizer state and epoch/batch all come from the same step.

    If training restarts before completion, the training state (the model's
    weights, optimizer and metric variables, and the epoch) is restored at
    the beginning of the new `fit` call. At the end of a successful `fit`
    the backup is deleted (unless `delete_checkpoint=False`).

    Example:

    >>> class InterruptingCallback(keras.callbacks.Callback):
    ...   def on_epoch_begin(self, epoch, logs=None):
    ...     if epoch == 4:
    ...       raise RuntimeError('Interrupting!')
    >>> callback = fastbackup.BackupAndRestore(backup_dir="/tmp/backup")
    >>> model = keras.models.Sequential([keras.layers.Dense(10)])
    >>> model.compile(keras.optimizers.SGD(), loss='mse')
    >>> model.build(input_shape=(None, 20))
    >>> try:
    ...   model.fit(np.arange(100).reshape(5, 20), np.zeros(5), epochs=10,
    ...             batch_size=1, callbacks=[callback, InterruptingCallback()],
    ...             verbose=0)
    ... except:
    ...   pass
    >>> history = model.fit(np.arange(100).reshape(5, 20), np.zeros(5),
    ...                     epochs=10, batch_size=1, callbacks=[callback],
    ...                     verbose=0)
    >>> len(history.history['loss'])
    6

    Args:
        backup_dir: String, path of the directory where the state is stored,
            or the URL of a prefix in an object store: `s3://bucket/prefix`
            or `gs://bucket/prefix` (see docs/remote-storage.md). It must
            not be shared with another training run or another callback (an
            advisory lock, or a lease in an object store, enforces this). A
            URL of any other scheme raises `ValueError`.
        save_freq: `"epoch"`, integer, or `False`. `"epoch"` saves at the
            end of each epoch; an integer N saves every N batches, counted
            across epochs as Keras does (0 and `True`, as in Keras, after
            every batch); `False` disables periodic saves (unlike Keras 3,
            which then saves after every batch). A negative integer raises
            `ValueError` (Keras saves after every batch). Defaults to
            `"epoch"`.
        double_checkpoint: Boolean. Keep the previous checkpoint too, and
            restore it when the newest one cannot be loaded (damaged file).
            Defaults to `False`.
        delete_checkpoint: Boolean. Delete the backup directory at the end
            of a successful `fit`. Defaults to `True`.
        resume_mid_epoch: Boolean or `None`. When true, a checkpoint taken in
            the middle of an epoch resumes at the next batch instead of
            replaying its epoch from batch 0 (Keras's behaviour). `None`
            reads `FASTBACKUP_RESUME_MID_EPOCH`. Defaults to `None`.
        handle_sigterm: Boolean or `None`. When true, SIGTERM makes training
            save at the next step boundary and stop. `None` reads
            `FASTBACKUP_HANDLE_SIGTERM`. Defaults to `None`.
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int | bool = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        *,
        resume_mid_epoch: bool | None = None,
        handle_sigterm: bool | None = None,
    ) -> None:
        super().__init__()
        if not backup_dir:
            raise ValueError("Empty `backup_dir` argument passed")
        _check_save_freq(save_freq)
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.double_checkpoint = double_checkpoint
        self.delete_checkpoint = delete_checkpoint
        self.config = config_lib.from_environ()
        # Picked once: an unsupported URL fails here, not at the first save.
        self._location_store = open_store(
            self.backup_dir,
            lease_seconds=self.config.lease_seconds,
            lease_wait_seconds=self.config.lease_wait_seconds,
            retry_seconds=self.config.retry_seconds,
        )
        # Made by the first `fit`, with the store it writes through (`store`).
        self._writer: BackgroundWriter | None = None
        self._coordinator: coordination.Coordinator | None = None
        # `None`: as the FASTBACKUP_* variables say.
        self.resume_mid_epoch = bool(self.config.resume_mid_epoch
                                     if resume_mid_epoch is None
                                     else resume_mid_epoch)
        self.handle_sigterm = bool(self.config.handle_sigterm
                                   if handle_sigterm is None
                                   else handle_sigterm)
        # Batch-end work reads the variables, so it must run between steps,
        # not on Keras's executor concurrently with the next step. With no
        # batch-level saves the hook does nothing and may run anywhere, but
        # for the SIGTERM stop of a multi-process job, which must be agreed
        # on between steps too.
        self.async_safe = (
            not isinstance(save_freq, int) or save_freq is False
        ) and not (self.handle_sigterm and backend.current().job())
        self._sigterm = SigtermPolicy(self.handle_sigterm)
        self._resume = MidEpochResume()
        self._snapshotter: Snapshotter | None = None
        # Overlapped snapshots (FASTBACKUP_OVERLAP): the gate on the
        # optimizer's update while a batch-end save copies in the background.
        self._gate: overlap.UpdateGate | None = None
        self.blocking_seconds: list[float] = []
        self.restored_from: tuple[int, int, int] | None = None
        self._current_epoch = 0
        self._reset_fit()

    def _reset_fit(self) -> None:
        """The state of one `fit`, fresh at each `on_train_begin`."""
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen = 0
        self._in_epoch = False
        # A save fell due while the writer was busy: made at the next
        # step boundary where it is free.
        self._deferred = False
        self._pool_sized = False
        # CRC-32C of the model config file written by this fit, recorded in
        # each of its checkpoints; `None` when not written.
        self._model_config_crc: int | None = None
        self._model_config_tried = False
        self.blocking_seconds = []
        self._resume.reset()  # a fit that raised left its hooks

    # Public API -------------------------------------------------------------

    @property
    def store(self) -> Store | None:
        """Where this callback's checkpoints go, from its first `fit` on: the
        location's store, or in a multi-process job this process's parts."""
        return self._writer.store if self._writer is not None else None

    @property
    def stats(self) -> WriterStats:
        """Counters of the background writer (saves, bytes, timings)."""
        return self._writer.stats if self._writer is not None else WriterStats()

    def wait_until_finished(self, raise_errors: bool = True) -> None:
        """Blocks until every checkpoint handed to the writer is durable.

        Args:
            raise_errors: re-raise a failure of the background writer.

        Raises:
            BackupWriteError: a background write failed.
        """
        if self._gate is not None:
            # An overlapped save reaches the writer once its copy is done.
            self._gate.wait()
        if self._writer is not None:
            self._writer.wait_until_finished(raise_errors=raise_errors)

    # Keras hooks ------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._gate is not None:
            # A fit that raised skipped on_train_end: its last overlapped
            # copy completes here, and a failure of it is raised.
            self._gate.uninstall()
            self._raise_copy_error()
        # Keras's callback refuses an unbuilt model here, checkpoint or not
        # (on TensorFlow, `fit` builds a model without `Input` only in its
        # first step). Refusing only when a checkpoint exists would let the
        # first run train and fail the resume, the one run the backup is for.
        # The optimizer is built only where the first step would build the
        # same one (every layer built); a restore builds it anyway.
        restore.make_ready(self.model, restoring=False)
        writer = self._start_writer()
        # A previous, interrupted fit may still be writing its last state.
        writer.wait_until_finished()
        store = writer.store
        store.acquire_lock(
            self, lambda: writer.wait_until_finished(raise_errors=False)
        )
        store.remove_temp_files()
        checkpoints = store.list_checkpoints()
        writer.next_step = checkpoints[0][0] + 1 if checkpoints else 0
        self._reset_fit()
        # Before a restore, which may wrap the train function the gate
        # re-makes on TensorFlow.
        self._install_gate()
        if checkpoints:
            self._restore()
        if self._snapshotter is None or self._snapshotter.model is not self.model:
            self._snapshotter = Snapshotter(self.model)
        self._snapshotter.refresh()
        if self.save_freq is not False:
            # Saves must find their buffers ready rather than fault fresh
            # memory in on the training thread (0.5-2 s per GB here). The
            # optimizer was built above, as a restore does, so that its
            # variables are part of the layout.
            layout = self._snapshotter.layout()
            self._size_pool(sum(spec.nbytes for spec in layout))
            writer.prepare(layout)
            self._store_model_config()
        self._sigterm.begin_fit(self.model, self._coordinator)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._raise_writer_error()
        self._current_epoch = epoch
        self._in_epoch = True
        self._resume.begin_epoch(epoch)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._raise_writer_error()
        self._raise_copy_error()
        if self._resume.hidden(batch):
            # A batch trained before the checkpoint, skipped: reaches here
            # only where the other callbacks could not be spared it.
            return
        if self._sigterm.reached_preemption():
            self._save(self._current_epoch, batch, block=True)
            self.wait_until_finished()
            self.model.stop_training = True
            log.warning("SIGTERM: saved epoch %d batch %d, stopping training",
                        self._current_epoch, batch)
            self._sigterm.stopped()
            return
        due = self._should_save_on_batch(batch)
        if due or self._deferred:
            self._save(
                self._current_epoch, batch, block=self.config.on_busy == "wait",
                due=due, overlapped=self._step_follows(batch),
            )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._raise_writer_error()
        self._current_epoch = epoch + 1
        self._last_batch_seen = 0
        self._in_epoch = False
        self._resume.end_epoch()
        if self.save_freq == "epoch":
            self._save(epoch + 1, 0, block=True)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        # The last overlapped copy completes (and reaches the writer) before
        # anything else; the model and optimizer are left as found.
        if self._gate is not None:
            self._gate.uninstall()
        self._resume.end_epoch()
        if self._sigterm.late_signal():
            # SIGTERM came after the last step boundary: the final state is
            # saved and kept, as for a preemption mid-training.
            self._deferred = True
        writer = self._get_writer()
        # A preempted run must resume: its backup is kept.
        delete = self.delete_checkpoint and not self._sigterm.preempted
        if delete:
            # Making durable a checkpoint that is deleted right after would
            # only keep training waiting.
            writer.abandon()
        elif self._deferred:
            # A save fell due while the writer was busy: make it now rather
            # than leave the newest due state unsaved.
            self._save(self._current_epoch, self._last_batch_seen, block=True)
        writer.wait_until_finished(raise_errors=False)
        self._raise_writer_error()
        self._raise_copy_error()
        # In a multi-process job, process 0 deletes or unlocks only once no
        # process writes, and `fit` returns everywhere once that is done.
        store = writer.store
        store.end_fit()
        if delete and store.exists():
            store.remove_all()
        store.release_lock(self)
        store.end_fit(after_cleanup=True)
        if self.params and self.params.get("verbose"):
            # After the deletion, so that it never names a deleted file.
            print(writer.stats.summary(
                self.blocking_seconds, None if delete else self.backup_dir))
        self._sigterm.chain_late_signal()

    # Internals ----------------------------------------------------------------

    def _get_writer(self) -> BackgroundWriter:
        """The writer, made by the first `fit` (see `_start_writer`)."""
        if self._writer is None:
            raise RuntimeError("the writer exists once `fit` has begun")
        return self._writer

    def _start_writer(self) -> BackgroundWriter:
        """The writer for a `fit`; the first one also decides the store.

        Whether this process is one of a multi-process job is known only
        once `fit` runs (after `jax.distributed.initialize`), and does not
        change afterwards; each later `fit` starts the coordinator's keys
        of a new fit.
        """
        if self._writer is not None:
            if self._coordinator is not None:
                self._coordinator.next_fit()
            return self._writer
        self._coordinator = coordination.coordinator(
            self._location_store.location, self.config.peer_timeout_seconds
        )
        self._writer = BackgroundWriter(
            self._location_store if self._coordinator is None
            else ProcessParts(self._location_store, self._coordinator),
            fmt.CompressionPolicy(self.config.compression_level),
            keep=2 if self.double_checkpoint else 1,
            sync=self.config.fsync,
            direct=self.config.direct_io,
        )
        # The host buffers live as long as the callback, so that a second
        # `fit` does not fault 1x the state in again; they are freed
        # (pending writes first) when the callback is collected.
        weakref.finalize(self, self._writer.close)
        return self._writer

    def _raise_writer_error(self) -> None:
        if self._writer is not None:
            self._writer.raise_error(warn_only=self.config.on_error == "warn")

    def _should_save_on_batch(self, batch: int) -> bool:
        """Counts batches as Keras does, including `steps_per_execution`."""
        if not isinstance(self.save_freq, int) or self.save_freq is False:
            return False
        if batch <= self._last_batch_seen:  # New epoch.
            add_batches = batch + 1
        else:
            add_batches = batch - self._last_batch_seen
        self._batches_seen_since_last_saving += add_batches
        self._last_batch_seen = batch
        if self._batches_seen_since_last_saving >= self.save_freq:
            self._batches_seen_since_last_saving = 0
            return True
        return False

    def _save(
        self, epoch: int, batch: int, block: bool, due: bool = True,
        overlapped: bool = False,
    ) -> None:
        start = time.perf_counter()
        if self._gate is not None:
            # At most one copy in flight, and a synchronous save (epoch end,
            # SIGTERM, end of fit) never races the previous overlapped one.
            self._gate.wait()
            self._raise_copy_error()
        writer = self._get_writer()
        # In a multi-process job every process must save the same steps:
        # a save skipped in one process would leave the others' parts of
        # it uncommittable.
        slot = writer.checkout(block=block or self._coordinator is not None)
        if slot is None:
            # The writer is busy: this save is merged into the next one,
            # taken at the first step boundary where the writer is free.
            if due:
                writer.stats.coalesced += 1
                log.debug("writer busy: save at epoch %d batch %d coalesced "
                          "(%d so far)", epoch, batch, writer.stats.coalesced)
            self._deferred = True
            return
        self._deferred = False
        try:
            # No makedirs here: on_train_begin created and locked the
            # directory. If it was removed since, the lock went with it, so
            # the write fails (BackupWriteError, ENOENT) instead of silently
            # recreating an unlocked directory.
            snapshotter: Snapshotter = self._snapshotter  # type: ignore[assignment]
            snapshot, deferred = snapshotter.take_split(
                slot.snapshot, epoch, batch,
                defer=overlap.updated_by_apply(self.model) if overlapped else None,
            )
            if not overlapped:
                deferred.run()
            if not self._model_config_tried:
                # A model built by its first step: its config is complete
                # only now.
                self._store_model_config()
            # An epoch-end state and the state after batch 0 of the next
            # epoch both record batch 0; the position tells them apart.
            snapshot.metadata = {
                "position": "batch_end" if self._in_epoch else "epoch_end",
            }
            if self._model_config_crc is not None:
                snapshot.metadata["model_config"] = self._model_config_crc
        except BaseException:
            writer.cancel(slot)
            raise
        if overlapped:
            # The trainable and optimizer variables are copied while the
            # next step runs; its update waits for the copy (see `overlap`).
            self._gate.start(  # type: ignore[union-attr]
                deferred.run,
                on_done=lambda: writer.submit(slot, snapshot),
                on_error=lambda error: writer.cancel(slot),
            )
        else:
            writer.submit(slot, snapshot)
        if not self._pool_sized:
            # An unbuilt model's layout is known only from its first save.
            self._size_pool(snapshot.nbytes)
        self.blocking_seconds.append(time.perf_counter() - start)

    def _store_model_config(self) -> None:
        """Writes the model's config for `export`, once per fit."""
        self._model_config_tried = True
        self._model_config_crc = model_config.store(
            self._get_writer().store, self.model
        )

    def _size_pool(self, state_bytes: int) -> None:
        self._get_writer().resize(
            writer_lib.pool_size(self.config.pending_snapshots, state_bytes)
        )
        self._pool_sized = True

    def _step_follows(self, batch: int) -> bool:
        """True if an overlapped save may be taken after `batch`.

        Only where another train step of the same epoch comes next: after
        an epoch's last batch come validation and epoch-end callbacks,
        which may assign the weights outside the optimizer (e.g.
        `SwapEMAWeights`) while nothing waits for the copy. With an epoch
        of unknown length the last batch is not known in time either.
        """
        if self._gate is None:
            return False
        if not self._gate.still_supported():
            self._raise_copy_error()
            self._gate = None
            return False
        steps = (self.params or {}).get("steps")
        return steps is not None and batch + 1 < steps

    def _install_gate(self) -> None:
        gate, self._gate = self._gate, None
        # Only batch-level saves overlap; epoch-end saves stay synchronous,
        # as they are the last thing of an epoch.
        if self.config.overlap and isinstance(self.save_freq, int) and (
            self.save_freq is not False  # 0 == False: compared by identity
        ):
            self._gate = overlap.gate_for(self.model, gate)

    def _raise_copy_error(self) -> None:
        error = self._gate.pop_error() if self._gate is not None else None
        if error is not None:
            raise error

    def _restore(self) -> None:
        model = self.model
        restore.make_ready(model)
        # Every process of a job restores the same checkpoint.
        agree = None if self._coordinator is None else (
            self._coordinator.unanimous(
                "restore", "the verification of the checkpoint to restore")
        )
        # Saved values of compiled metrics not built yet (TensorFlow builds
        # them in the first step): a mid-epoch resume assigns them once built.
        unbuilt_metrics: dict[str, Any] = {}
        reader = restore.restore_latest(
            self._location_store, model, fall_back=self.double_checkpoint,
            agree=agree, unbuilt_metrics=unbuilt_metrics,
        )
        if reader is None:
            return
        self.restored_from = (reader.step, reader.epoch, reader.batch)
        mid_epoch = reader.meta.get("extra", {}).get("position") == "batch_end"
        epoch = reader.epoch
        if self.resume_mid_epoch:
            # After an epoch's last batch: resumed as that epoch's end.
            epoch, mid_epoch = resume_lib.continues_at(
                reader.epoch, reader.batch, mid_epoch,
                (self.params or {}).get("steps"))
        model._initial_epoch = epoch
        self._current_epoch = epoch
        if self.resume_mid_epoch and mid_epoch:
            self._resume.start(self, model, reader.epoch, reader.batch,
                               unbuilt_metrics)
            # Counted as in the run that saved: the next save falls due
            # `save_freq` batches after the checkpoint's.
            self._last_batch_seen = reader.batch
            self._batches_seen_since_last_saving = 0
        self._report_resume(reader.path, reader.epoch, reader.batch, mid_epoch,
                            resumed_epoch=epoch)

    def _report_resume(
        self, path: str, epoch: int, batch: int, mid_epoch: bool,
        resumed_epoch: int | None = None,
    ) -> None:
        """Says once where training resumed from: in the log, and on the
        console under `verbose` (Keras's callback says nothing).

        `resumed_epoch` is where training continues when not at the
        checkpoint's epoch (after an epoch's last batch, see
        `resume.continues_at`)."""
        saved_epoch = epoch
        epoch = epoch if resumed_epoch is None else resumed_epoch
        epochs = (self.params or {}).get("epochs")
        shown = f" (Epoch {epoch + 1}/{epochs})" if epochs else ""
        if epochs is not None and epoch >= epochs:
            then = f"no epoch is left to train (epochs={epochs})"
        elif mid_epoch and self.resume_mid_epoch:
            then = f"training continues at epoch {epoch}{shown}, batch {batch + 1}"
        elif mid_epoch:
            then = (
                f"training continues at epoch {epoch}{shown}, batch 0: a "
                "mid-epoch checkpoint replays its epoch, as with Keras "
                "(resume_mid_epoch=True skips the batches already trained)"
            )
        else:
            then = f"training continues at epoch {epoch}{shown}"
        message = (f"resumed from {path} (epoch {saved_epoch}, batch {batch}); "
                   f"{then}")
        log.info("%s", message)
        if self.params and self.params.get("verbose"):
            print(f"fastbackup: {message}")
