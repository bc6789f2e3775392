"""`BackupAndRestore`: the Keras callback users put in `model.fit`."""

from __future__ import annotations

import logging
import os
import signal
import statistics
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from fastbackup import config as config_lib
from fastbackup import format as fmt
from fastbackup import (
    coordination,
    model_config,
    overlap,
    parts,
    restore,
    storage,
)
from fastbackup import writer as writer_lib
from fastbackup.snapshot import Snapshotter, collect_variables
from fastbackup.writer import BackgroundWriter, WriterStats, as_write_error

log = logging.getLogger("fastbackup")


def end_of_data_error() -> type[BaseException]:
    """The backend's end-of-data error besides `StopIteration`."""
    if keras.backend.backend() != "tensorflow":
        return StopIteration
    import tensorflow as tf

    return tf.errors.OutOfRangeError


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
            across epochs as Keras does; `False` disables periodic saves
            (unlike Keras 3, which then saves after every batch). Defaults
            to `"epoch"`.
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
        if save_freq is not False and (
            save_freq != "epoch"
            and (
                not isinstance(save_freq, int)
                or isinstance(save_freq, bool)
                or save_freq <= 0
            )
        ):
            raise ValueError(
                "Invalid value for argument `save_freq`. "
                f"Received: save_freq={save_freq}. "
                "Expected either 'epoch', a positive integer, or False."
            )
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.double_checkpoint = double_checkpoint
        self.delete_checkpoint = delete_checkpoint
        self.config = config_lib.from_environ()
        # Picked once: an unsupported URL fails here, not at the first save.
        self._location_store = storage.open_store(
            self.backup_dir,
            lease_seconds=self.config.lease_seconds,
            retry_seconds=self.config.retry_seconds,
        )
        # The store a fit writes through: the location's own, or in a
        # multi-process job this process's parts of it (`parts`).
        self.store: storage.Store = self._location_store
        self._coordinator: coordination.Coordinator | None = None
        # Batch ends seen in this fit: the clock on which the processes of
        # a multi-process job agree to stop at SIGTERM.
        self._fit_batches = 0
        self.resume_mid_epoch = (
            self.config.resume_mid_epoch
            if resume_mid_epoch is None
            else bool(resume_mid_epoch)
        )
        self.handle_sigterm = (
            self.config.handle_sigterm
            if handle_sigterm is None
            else bool(handle_sigterm)
        )
        # Batch-end work reads the variables, so it must run between steps,
        # not on Keras's executor concurrently with the next step. With no
        # batch-level saves the hook does nothing and may run anywhere, but
        # for the SIGTERM stop of a multi-process job, which must be agreed
        # on between steps too.
        self.async_safe = (
            not isinstance(save_freq, int) or save_freq is False
        ) and not (self.handle_sigterm and coordination.job_client())
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen = 0
        self._current_epoch = 0
        self._deferred = False
        self._writer: BackgroundWriter | None = None
        self._pool_sized = False
        # CRC-32C of the model config file written by this fit, recorded in
        # each of its checkpoints; `None` when not written.
        self._model_config_crc: int | None = None
        self._model_config_tried = False
        self._snapshotter: Snapshotter | None = None
        self.blocking_seconds: list[float] = []
        self.restored_from: tuple[int, int, int] | None = None
        self._in_epoch = False
        # Exact mid-epoch resume: batches of the resumed epoch already
        # trained before the checkpoint, and the saved metric values.
        self._skip_batches = 0
        self._resume_epoch: int | None = None
        # Batches of the resumed epoch up to this index are hidden from every
        # callback; -1 when none is.
        self._hidden_through = -1
        self._hiding: _HiddenBatches | None = None
        self._saved_metrics: list[tuple[Any, Any]] = []
        self._sigterm_pending = False
        self._preempted = False
        self._previous_sigterm: Any = None
        # Overlapped snapshots (FASTBACKUP_OVERLAP): the gate on the
        # optimizer's update while a batch-end save copies in the background.
        self._gate: overlap.UpdateGate | None = None

    # Public API -------------------------------------------------------------

    @property
    def stats(self) -> WriterStats:
        """Counters of the background writer (saves, bytes, timings)."""
        return self._get_writer().stats

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
        writer = self._get_writer()
        if self._gate is not None:
            # A fit that raised skipped on_train_end: its last overlapped
            # copy completes here, and a failure of it is raised.
            self._gate.uninstall()
            self._raise_copy_error()
        # A previous, interrupted fit may still be writing its last state.
        writer.wait_until_finished()
        self._coordinator = coordination.coordinator(
            self._location_store.location, self.config.peer_timeout_seconds
        )
        self.store = (
            self._location_store if self._coordinator is None
            else parts.ProcessParts(self._location_store, self._coordinator)
        )
        writer.store = self.store
        self._fit_batches = 0
        self.store.acquire_lock(
            self,
            lambda: writer.wait_until_finished(raise_errors=False),
        )
        self.store.remove_temp_files()
        checkpoints = self.store.list_checkpoints()
        writer.next_step = checkpoints[0][0] + 1 if checkpoints else 0
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen = 0
        self._deferred = False
        self._sigterm_pending = False
        self._preempted = False
        self._in_epoch = False
        self._skip_batches = 0
        self._resume_epoch = None
        self._stop_hiding()  # left by a fit that raised
        self._saved_metrics = []
        self.blocking_seconds = []
        self._pool_sized = False
        self._model_config_crc = None
        self._model_config_tried = False
        # Before a restore, which may wrap the train function the gate
        # re-makes on TensorFlow.
        self._install_gate()
        if checkpoints:
            self._restore()
        if self._snapshotter is None or self._snapshotter.model is not self.model:
            self._snapshotter = Snapshotter(self.model)
        self._snapshotter.refresh()
        if self.save_freq is not False and self.model.built:
            # Saves must find their buffers ready rather than fault fresh
            # memory in on the training thread (0.5-2 s per GB here). The
            # optimizer is built now, as a restore does, so that its
            # variables are part of the layout. An unbuilt model (built by
            # its first step) gets its buffers at the first save instead.
            optimizer = getattr(self.model, "optimizer", None)
            if optimizer is not None and not optimizer.built:
                optimizer.build(self.model.trainable_variables)
            layout = self._snapshotter.layout()
            self._size_pool(sum(spec.nbytes for spec in layout))
            writer.prepare(layout)
            self._store_model_config()
        if self.handle_sigterm:
            self._install_sigterm_handler()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._raise_writer_error()
        self._current_epoch = epoch
        self._in_epoch = True
        if epoch == self._resume_epoch and self._saved_metrics:
            # Keras reset the metrics just before this hook; the resumed
            # epoch continues the running values it had at the checkpoint.
            for variable, value in self._saved_metrics:
                variable.assign(value)
        self._saved_metrics = []

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._raise_writer_error()
        self._raise_copy_error()
        if batch <= self._hidden_through:
            # A batch trained before the checkpoint, skipped: reaches here
            # only where the other callbacks could not be spared it.
            return
        self._fit_batches += 1
        if self._preemption_due():
            self._stop_for_preemption(batch)
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
        self._skip_batches = 0
        self._stop_hiding()
        if self.save_freq == "epoch":
            self._save(epoch + 1, 0, block=True)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        # The last overlapped copy completes (and reaches the writer) before
        # anything else; the model and optimizer are left as found.
        if self._gate is not None:
            self._gate.uninstall()
        self._stop_hiding()
        previous_sigterm = self._previous_sigterm
        self._restore_sigterm_handler()
        late_sigterm = self._sigterm_pending
        if self.handle_sigterm and self._coordinator is not None:
            # A process told to stop after the last step boundary (or that
            # proposed a boundary that never came): every process of the
            # job saves that same final state, or none does.
            late_sigterm = any(self._coordinator.agree(
                "sigterm-at-end",
                late_sigterm or (not self._preempted and self._coordinator.peek(
                    "sigterm") is not None),
                "the processes' SIGTERM at the end of fit",
            ))
        if late_sigterm:
            # SIGTERM came after the last step boundary: the final state is
            # saved and kept, as for a preemption mid-training.
            self._sigterm_pending = False
            self._preempted = True
            self._deferred = True
        writer = self._get_writer()
        # A preempted run must resume: its backup is kept.
        delete = self.delete_checkpoint and not self._preempted
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
        self._log_summary()
        # In a multi-process job, process 0 deletes or unlocks only once no
        # process writes, and `fit` returns everywhere once that is done.
        self.store.end_fit()
        if delete and self.store.exists():
            self.store.remove_all()
        self.store.release_lock(self)
        self.store.end_fit(after_cleanup=True)
        if late_sigterm and callable(previous_sigterm):
            previous_sigterm(signal.SIGTERM, None)

    # Internals ----------------------------------------------------------------

    def _get_writer(self) -> BackgroundWriter:
        if self._writer is None:
            self._writer = BackgroundWriter(
                self.store,
                fmt.CompressionPolicy(self.config.compression_level),
                keep=2 if self.double_checkpoint else 1,
                sync=self.config.fsync,
                direct=self.config.direct_io,
            )
            # The host buffers live as long as the callback, so that a
            # second `fit` does not fault 1x the state in again; they are
            # freed (pending writes first) when the callback is collected.
            weakref.finalize(self, self._writer.close)
        return self._writer

    def _raise_writer_error(self) -> None:
        if self._writer is None:
            return
        error = self._writer.check_error()
        if error is None:
            return
        if self.config.on_error == "warn":
            log.warning("fastbackup: a checkpoint write failed; training "
                        "goes on (FASTBACKUP_ON_ERROR=warn): %s", error)
            return
        raise as_write_error(error)

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
            if overlapped:
                snapshot, deferred = snapshotter.take_split(
                    slot.snapshot, epoch, batch, defer=self._updated_by_apply()
                )
            else:
                snapshot = snapshotter.take(slot.snapshot, epoch, batch)
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
        data, not_stored = model_config.describe(self.model)
        if not_stored:
            log.info("fastbackup: the model's config is not stored, so "
                     "`export` will need --model or --model-factory: %s",
                     not_stored)
        try:
            self.store.write_object(storage.MODEL_CONFIG_NAME, data)
        except OSError as e:
            # Only `export` needs it, and checkpoints that record no config
            # make `export` ask for the model: training goes on.
            log.warning("fastbackup: cannot write the model config (export "
                        "will need --model or --model-factory): %s", e)
            return
        self._model_config_crc = model_config.checksum(data)

    def _size_pool(self, state_bytes: int) -> None:
        self._get_writer().resize(
            writer_lib.pool_size(self.config.pending_snapshots, state_bytes)
        )
        self._pool_sized = True

    def _updated_by_apply(self) -> Callable[[Any], bool]:
        """Picks the variables that change only inside `optimizer.apply`."""
        model = self.model
        ids = {id(v) for v in model.trainable_variables}
        ids.update(id(v) for v in model.optimizer.variables)
        return lambda variable: id(variable) in ids

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
        reason = self._gate.recheck()
        if reason is not None:
            log.info("fastbackup: saves copy synchronously from now on: %s",
                     reason)
            self._gate.uninstall()
            self._raise_copy_error()
            self._gate = None
            return False
        steps = (self.params or {}).get("steps")
        return steps is not None and batch + 1 < steps

    def _install_gate(self) -> None:
        gate, self._gate = self._gate, None
        if not self.config.overlap or self.save_freq in (False, "epoch"):
            # Only batch-level saves overlap; epoch-end saves stay
            # synchronous, as they are the last thing of an epoch.
            return
        reason = overlap.unsupported_reason(self.model)
        if reason is not None:
            log.info("fastbackup: FASTBACKUP_OVERLAP=on, but saves copy "
                     "synchronously: %s", reason)
            return
        if gate is None or gate.model is not self.model or (
            gate.optimizer is not self.model.optimizer
        ):
            gate = overlap.UpdateGate(self.model)
        # The same gate again keeps its gated train function (no retrace).
        self._gate = gate
        gate.install()

    def _raise_copy_error(self) -> None:
        error = self._gate.pop_error() if self._gate is not None else None
        if error is not None:
            raise error

    def _restore(self) -> None:
        model = self.model
        if not model.built:
            raise ValueError(
                "To use the BackupAndRestore callback, "
                "you model must be built before you call `fit()`. "
                f"Model {model} is unbuilt. You can build it "
                "beforehand by calling it on a batch of data."
            )
        if model.optimizer is not None and not model.optimizer.built:
            # Make sure optimizer variables exist before loading.
            model.optimizer.build(model.trainable_variables)
        reader = restore.restore_latest(
            self.store, model, fall_back=self.double_checkpoint,
            agree=self._agree_on_restore(),
        )
        if reader is None:
            return
        self.restored_from = (reader.step, reader.epoch, reader.batch)
        model._initial_epoch = reader.epoch
        self._current_epoch = reader.epoch
        mid_epoch = reader.meta.get("extra", {}).get("position") == "batch_end"
        if self.resume_mid_epoch and mid_epoch:
            self._resume_mid_epoch(reader.epoch, reader.batch)
        log.info("restored %s: epoch %d, batch %d", reader.path, reader.epoch,
                 reader.batch)

    def _agree_on_restore(self) -> Callable[[bool], bool] | None:
        """Makes every process of a job restore the same checkpoint."""
        coordinator = self._coordinator
        if coordinator is None:
            return None
        tried = [0]

        def agree(verified: bool) -> bool:
            tried[0] += 1
            return all(coordinator.agree(
                f"restore/{tried[0]}", verified,
                "the verification of the checkpoint to restore",
            ))

        return agree

    def _preemption_due(self) -> bool:
        """True at the step boundary where training stops for SIGTERM.

        In one process: the first boundary after the signal. In a
        multi-process job the signal may reach one process only, and all
        must save the same step: the first process to see it proposes the
        next boundary, and every process stops there. Each boundary comes
        after a step whose logs Keras has fetched, so after a step all the
        processes took part in: a process reaching the proposed boundary
        has passed the proposer's, where the proposal was published.
        """
        coordinator = self._coordinator
        if coordinator is None or not self.handle_sigterm:
            return self._sigterm_pending
        if self._sigterm_pending:
            coordinator.first_wins("sigterm", self._fit_batches + 1)
            self._sigterm_pending = False
        stop = coordinator.peek("sigterm")
        if stop is None or self._fit_batches < stop:
            return False
        if self._fit_batches > stop:
            log.warning("fastbackup: SIGTERM stop agreed for batch %d of this "
                        "fit was reached late, at %d", stop, self._fit_batches)
        return True

    def _resume_mid_epoch(self, epoch: int, batch: int) -> None:
        """Makes the resumed `fit` skip the batches trained before `batch`.

        Keras's loop cannot start mid-epoch, so the train function is
        wrapped: for the first `batch + 1` steps of the resumed epoch it
        consumes the input without training, so that the data position,
        the optimizer's iteration count, the learning-rate schedule and
        every seed generator continue exactly where the checkpoint was.
        """
        model = self.model
        self._skip_batches = batch + 1
        self._resume_epoch = epoch
        # Counted as in the run that saved: the next save falls due
        # `save_freq` batches after the checkpoint's.
        self._last_batch_seen = batch
        self._batches_seen_since_last_saving = 0
        self._hide_batches_through(batch)
        self._saved_metrics = [
            (v, np.array(v.numpy(), copy=True))
            for name, v in collect_variables(model)
            if name.startswith("metrics.")
        ]
        real = model.train_function
        backend = keras.backend.backend()
        steps = int(getattr(model, "steps_per_execution", 1) or 1)

        def skipping_train_function(*args: Any) -> Any:
            if self._skip_batches <= 0:
                model.train_function = real
                return real(*args)
            self._skip_batches -= steps
            if backend == "torch":
                return {}  # the loop already took this step's batch
            # TensorFlow's and JAX's train functions pull their batches
            # from the iterator they are given; the skip must do the same.
            iterator = args[1] if backend == "jax" else args[0]
            for _ in range(steps):
                try:
                    next(iterator)
                except (StopIteration, end_of_data_error()):
                    break
            return ({}, args[0]) if backend == "jax" else {}

        model.train_function = skipping_train_function
        log.info("resuming mid-epoch: epoch %d continues after batch %d",
                 epoch, batch)

    def _hide_batches_through(self, batch: int) -> None:
        """Spares every callback the batch hooks of the skipped batches.

        Progress bars, TensorBoard and step-counting callbacks must see only
        the batches trained, under the indices they had in the interrupted
        run. Keras's fit loop calls its `CallbackList` for every batch of the
        epoch, so that list's two batch hooks are wrapped until the resumed
        epoch ends. A callback holds no reference to its list: it is found
        as the caller of `on_train_begin`.
        """
        self._hidden_through = batch
        callbacks = _calling_callback_list(self)
        if callbacks is None:
            log.warning(
                "resume_mid_epoch: the CallbackList calling this callback was "
                "not found (fit called by a custom loop?); other callbacks "
                "see batches 0 to %d of the resumed epoch, which are skipped "
                "without training", batch)
            return
        self._hiding = _HiddenBatches(
            callbacks, lambda b: b <= self._hidden_through
        )

    def _stop_hiding(self) -> None:
        self._hidden_through = -1
        if self._hiding is not None:
            self._hiding.remove()
            self._hiding = None

    def _log_summary(self) -> None:
        if not self.params or not self.params.get("verbose"):
            return
        s = self._get_writer().stats
        blocking = (
            statistics.median(self.blocking_seconds) * 1e3
            if self.blocking_seconds else 0.0
        )
        last = (
            f"step {s.last_durable[0]} (epoch {s.last_durable[1]}, batch "
            f"{s.last_durable[2]})" if s.last_durable else "none"
        )
        print(
            f"fastbackup: {s.saves} saves, {s.coalesced} coalesced, "
            f"{s.bytes_written / 1e6:.1f} MB written, median blocking "
            f"{blocking:.1f} ms/save, last durable {last}"
        )

    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("handle_sigterm needs fit() on the main thread; "
                        "SIGTERM is not handled")
            return
        previous = signal.getsignal(signal.SIGTERM)
        # A handler left by a fit that raised (Keras then skips
        # on_train_end) is replaced, not chained: chain what it chained.
        previous = getattr(previous, "_fastbackup_previous", previous)
        # Taken here, not in the handler: on JAX, `Callback.model` writes the
        # trainer's state back into the variables, and a signal can arrive
        # inside a step, after the state it donates was read. Syncing then
        # would leave the variables holding arrays the step deletes.
        model = self.model

        def handler(signum: int, frame: Any) -> None:
            if frame is None or _in_fit(frame, model):
                # Only a flag: the save must happen between two steps.
                self._sigterm_pending = True
                return
            # The fit that installed this handler raised: no step boundary
            # will come. Hand the signal to the previous handler.
            self._previous_sigterm = None
            if previous is None:
                return
            signal.signal(signal.SIGTERM, previous)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signum)

        handler._fastbackup_previous = previous  # type: ignore[attr-defined]
        self._previous_sigterm = previous
        signal.signal(signal.SIGTERM, handler)

    def _stop_for_preemption(self, batch: int) -> None:
        self._sigterm_pending = False
        self._preempted = True
        self._save(self._current_epoch, batch, block=True)
        self.wait_until_finished()
        self.model.stop_training = True
        log.warning("SIGTERM: saved epoch %d batch %d, stopping training",
                    self._current_epoch, batch)
        previous = self._previous_sigterm
        self._restore_sigterm_handler()
        # The previous handler runs once our state is durable.
        if callable(previous):
            previous(signal.SIGTERM, None)

    def _restore_sigterm_handler(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


class _HiddenBatches:
    """Wraps a `CallbackList`'s batch hooks to drop some batches.

    Args:
        callbacks: the list `fit` calls.
        hidden: tells whether a batch index is hidden.
    """

    _HOOKS = ("on_train_batch_begin", "on_train_batch_end")

    def __init__(self, callbacks: Any, hidden: Any) -> None:
        self.callbacks = callbacks
        for name in self._HOOKS:
            real = getattr(callbacks, name)

            def hook(batch: int, logs: Any = None, _real: Any = real) -> Any:
                if hidden(batch):
                    return None
                return _real(batch, logs)

            # An instance attribute shadows the class's method for this list
            # only; removing it restores the method.
            setattr(callbacks, name, hook)

    def remove(self) -> None:
        for name in self._HOOKS:
            self.callbacks.__dict__.pop(name, None)


def _calling_callback_list(callback: Any) -> Any:
    """The `CallbackList` whose hook is calling `callback`, or `None`."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if (
            isinstance(owner, keras.callbacks.CallbackList)
            and any(c is callback for c in owner.callbacks)
        ):
            return owner
        frame = frame.f_back
    return None


def _in_fit(frame: Any, model: Any) -> bool:
    """True if `frame` is inside `model.fit`."""
    while frame is not None:
        if (
            frame.f_code.co_name == "fit"
            and frame.f_locals.get("self") is model
        ):
            return True
        frame = frame.f_back
    return False
