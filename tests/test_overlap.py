"""Tests of `fastbackup.overlap`: saves copied behind the next step.

With `FASTBACKUP_OVERLAP=on`, a batch-level save copies the trainable and
optimizer variables on a background thread while the next step runs, and
that step's optimizer update waits for the copy. The copy is slowed down
here (`slow_copy`) so that the next step's forward and backward passes, and
without the gate its update too, certainly run before the copy: a checkpoint
equal to the state recorded at its step then proves both the gate and the
split between what is copied at once and what is deferred.

JAX has no gate (its trainer donates the state to each step): there the
same tests check that saves fall back to the synchronous copy.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import fastbackup
from fastbackup import overlap
from fastbackup import snapshot as snapshot_lib
from fastbackup.format import CheckpointReader
from fastbackup.stores.local import LocalStore
from tests.conftest import all_state, assert_state_equal, make_data, make_model

GATED = keras.backend.backend() in ("tensorflow", "torch")


@pytest.fixture(autouse=True)
def _overlap_on(monkeypatch):
    monkeypatch.setenv("FASTBACKUP_OVERLAP", "on")


@pytest.fixture(autouse=True)
def _no_hang():
    # A deadlock between the gate and the copy must fail the run, not hang
    # it: the process dumps every thread's stack and exits.
    faulthandler.dump_traceback_later(240, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def slow_copy(monkeypatch):
    """Delays every deferred copy, so the next step runs before it."""
    real = snapshot_lib.DeferredCopy.run

    def run(self):
        if len(self):
            time.sleep(0.15)
        real(self)

    monkeypatch.setattr(snapshot_lib.DeferredCopy, "run", run)


class Recorder(keras.callbacks.Callback):
    """Records every variable at each batch end, keyed (epoch, batch)."""

    def __init__(self):
        super().__init__()
        self.states: dict[tuple[int, int], list[np.ndarray]] = {}
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.states[(self._epoch, batch)] = all_state(self.model)


def checkpoint_state(path) -> tuple[tuple[int, int], list[np.ndarray]]:
    with CheckpointReader(path) as reader:
        arrays = [np.array(reader.verified_view(e)) for e in reader.entries]
        return (reader.epoch, reader.batch), arrays


def assert_left_as_found(model, train_function=None):
    assert "apply" not in model.optimizer.__dict__
    if train_function is not None:
        assert model.train_function is train_function


def test_unsupported_reason_per_backend():
    model = make_model()
    reason = overlap.unsupported_reason(model)
    if GATED:
        assert reason is None
    else:
        assert "donates" in reason


@pytest.mark.skipif(not GATED, reason="JAX has no gate: its saves are "
                    "always synchronous")
def test_compiled_train_step_is_not_gated():
    model = make_model()
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    assert "jit_compile" in overlap.unsupported_reason(model)


@pytest.mark.skipif(keras.backend.backend() != "torch",
                    reason="without an accelerator, only torch can place "
                    "variables off the host (its meta device)")
def test_variables_off_the_host_are_not_gated(tmp_path):
    # A GPU's copy to the host is not overlapped: such a model must save
    # synchronously rather than read device memory behind the step.
    with keras.device("meta"):
        model = make_model()
    reason = overlap.unsupported_reason(model)
    assert "lives on meta, not on the host" in reason


def test_overlapped_checkpoints_equal_state_at_their_step(tmp_path, slow_copy,
                                                           monkeypatch):
    monkeypatch.setenv("FASTBACKUP_ON_BUSY", "wait")  # every save written
    x, y = make_data(n=32)
    model = make_model()
    recorder = Recorder()
    cb = fastbackup.BackupAndRestore(
        tmp_path, save_freq=3, double_checkpoint=True, delete_checkpoint=False
    )
    model.fit(x, y, epochs=2, batch_size=4, verbose=0,
              callbacks=[recorder, cb])
    checkpoints = LocalStore(str(tmp_path)).list_checkpoints()
    assert [step for step, _ in checkpoints] == [4, 3]
    positions = []
    for _, path in checkpoints:
        position, saved = checkpoint_state(path)
        positions.append(position)
        assert_state_equal(saved, recorder.states[position])
    assert positions == [(1, 6), (1, 3)]
    if GATED:
        # All 5 saves (global batches 3, 6, 9, 12, 15 of 16) overlapped the
        # next step; its update waited for the copy unless the forward and
        # backward passes outlasted the copy's 0.15 s delay (a loaded
        # machine).
        assert cb._gate.copies == 5
        assert 1 <= len(cb._gate.held_seconds) <= 5
    else:
        assert cb._gate is None
    assert_left_as_found(model)


def test_overlapped_and_synchronous_saves_write_the_same_state(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("FASTBACKUP_ON_BUSY", "wait")
    x, y = make_data(n=32)
    results = []
    for setting in ("off", "on"):
        monkeypatch.setenv("FASTBACKUP_OVERLAP", setting)
        keras.utils.set_random_seed(7)
        model = make_model()
        backup = tmp_path / setting
        cb = fastbackup.BackupAndRestore(backup, save_freq=5,
                                         delete_checkpoint=False)
        model.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[cb])
        [(_, path)] = LocalStore(str(backup)).list_checkpoints()
        results.append((checkpoint_state(path), all_state(model)))
        assert (cb._gate is not None) == (setting == "on" and GATED)
    (sync_pos, sync_saved), sync_final = results[0]
    (over_pos, over_saved), over_final = results[1]
    assert sync_pos == over_pos == (1, 6)
    assert_state_equal(over_saved, sync_saved)
    assert_state_equal(over_final, sync_final)


def test_pending_copy_is_complete_when_fit_returns(
    tmp_path, slow_copy, monkeypatch
):
    monkeypatch.setenv("FASTBACKUP_ON_BUSY", "wait")  # not coalesced
    x, y = make_data(n=32)
    model = make_model()
    model.make_train_function()
    before = model.train_function
    recorder = Recorder()

    class StopAfter(keras.callbacks.Callback):
        # Placed after the backup: no step follows its overlapped save.
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                self.model.stop_training = True

    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=4,
                                     delete_checkpoint=False)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0,
              callbacks=[recorder, cb, StopAfter()])
    # No wait here: on_train_end completed the copy and the write.
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    position, saved = checkpoint_state(path)
    assert position == (0, 3)
    assert_state_equal(saved, recorder.states[position])
    assert_state_equal(saved, all_state(model))
    if GATED:
        assert cb._gate.copies == 1
        assert cb._gate.held_seconds == []  # no update came after it
    assert_left_as_found(model, before)


def test_save_at_an_epochs_last_batch_is_synchronous(tmp_path, slow_copy,
                                                     monkeypatch):
    monkeypatch.setenv("FASTBACKUP_ON_BUSY", "wait")
    x, y = make_data(n=32)
    model = make_model()
    recorder = Recorder()
    swapped = []

    class AssignAtEpochEnd(keras.callbacks.Callback):
        # Like SwapEMAWeights: assigns weights outside the optimizer, right
        # after the epoch's last batch.
        def on_epoch_end(self, epoch, logs=None):
            for v in self.model.trainable_variables:
                v.assign(v * 0.5)
            swapped.append(epoch)

    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=4,
                                     delete_checkpoint=False)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0,
              callbacks=[recorder, AssignAtEpochEnd(), cb])
    assert swapped == [0]
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    position, saved = checkpoint_state(path)
    assert position == (0, 7)
    assert_state_equal(saved, recorder.states[position])
    if GATED:
        # Batch 3's save overlapped step 4; batch 7's was synchronous.
        assert cb._gate.copies == 1


def test_copy_error_reaches_the_training_thread(tmp_path, monkeypatch):
    def fail(self):
        raise OSError(28, "injected copy failure")

    monkeypatch.setattr(snapshot_lib.DeferredCopy, "run", fail)
    x, y = make_data(n=32)
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=2)
    batches = []

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            batches.append(batch)

    with pytest.raises(OSError, match="injected copy failure"):
        model.fit(x, y, epochs=1, batch_size=4, verbose=0,
                  callbacks=[Count(), cb])
    # Overlapped: raised at the batch end after the save's next step.
    # Synchronous (JAX): raised by the save itself.
    assert batches == ([0, 1, 2] if GATED else [0, 1])
    assert LocalStore(str(tmp_path)).list_checkpoints() == []
    # The callback is usable again, and the model is left as found.
    monkeypatch.undo()
    monkeypatch.setenv("FASTBACKUP_OVERLAP", "on")
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=2,
                                     delete_checkpoint=False)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[cb])
    assert len(LocalStore(str(tmp_path)).list_checkpoints()) == 1
    assert_left_as_found(model)


def test_step_that_raises_does_not_lose_the_overlapped_save(tmp_path,
                                                             slow_copy):
    x, y = make_data(n=32)
    model = make_model()
    recorder = Recorder()

    class FailNextStep(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 3:
                raise RuntimeError("Interrupting!")

    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=3)
    with pytest.raises(RuntimeError, match="Interrupting!"):
        model.fit(x, y, epochs=2, batch_size=4, verbose=0,
                  callbacks=[recorder, FailNextStep(), cb])
    # The copy went on without the step; its snapshot reaches the disk.
    cb.wait_until_finished()
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    position, saved = checkpoint_state(path)
    assert position == (0, 2)
    assert_state_equal(saved, recorder.states[position])
    # Keras skipped on_train_end: the next fit takes the stale gate off,
    # resumes from the checkpoint and leaves the model as found.
    model.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[cb])
    assert cb.restored_from == (0, 0, 2)
    assert_left_as_found(model)


def test_copy_in_flight_at_interpreter_exit_reaches_the_disk(tmp_path):
    script = f"""
import os, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ["FASTBACKUP_OVERLAP"] = "on"
import numpy as np, keras, fastbackup
from fastbackup import snapshot
real = snapshot.DeferredCopy.run
def slow(self):
    time.sleep(1.0 if len(self) else 0.0)
    real(self)
snapshot.DeferredCopy.run = slow
model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(2)])
model.compile("adam", "mse")
cb = fastbackup.BackupAndRestore({str(tmp_path)!r}, save_freq=2)
class Boom(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if batch == 2:
            raise SystemExit(3)
model.fit(np.ones((16, 4)), np.ones((16, 2)), batch_size=2, epochs=1,
          verbose=0, callbacks=[cb, Boom()])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    # The save of batch 1 was still being copied when the interpreter began
    # to exit (on JAX it was synchronous).
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    with CheckpointReader(path) as reader:
        assert (reader.epoch, reader.batch) == (0, 1)
        reader.verify()


def test_epoch_saves_stay_synchronous(tmp_path):
    x, y = make_data(n=16)
    model = make_model()
    seen = []

    class Inspect(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append("apply" in self.model.optimizer.__dict__)

    cb = fastbackup.BackupAndRestore(tmp_path, delete_checkpoint=False)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0,
              callbacks=[Inspect(), cb])
    assert seen == [False] * 8
    assert cb._gate is None
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    position, saved = checkpoint_state(path)
    assert position == (2, 0)
    assert_state_equal(saved, all_state(model))


def test_sigterm_save_after_an_overlapped_one(tmp_path, slow_copy):
    x, y = make_data(n=32)
    model = make_model()
    recorder = Recorder()

    class Preempt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                signal.raise_signal(signal.SIGTERM)

    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=2,
                                     handle_sigterm=True)
    previous = signal.getsignal(signal.SIGTERM)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0,
              callbacks=[recorder, Preempt(), cb])
    assert signal.getsignal(signal.SIGTERM) is previous
    # The overlapped save of batch 1 was superseded by the SIGTERM save of
    # batch 2, made synchronously; the preempted backup is kept.
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    position, saved = checkpoint_state(path)
    assert position == (0, 2)
    assert_state_equal(saved, recorder.states[position])
    assert sorted(recorder.states) == [(0, 0), (0, 1), (0, 2)]
    assert_left_as_found(model)


@pytest.mark.skipif(GATED, reason="only JAX falls back for its backend")
def test_jax_saves_synchronously_and_says_why(tmp_path, caplog):
    x, y = make_data(n=16)
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=2,
                                     delete_checkpoint=False)
    with caplog.at_level(logging.INFO, logger="fastbackup"):
        model.fit(x, y, epochs=1, batch_size=4, verbose=0, callbacks=[cb])
    assert cb._gate is None
    assert "saves copy synchronously" in caplog.text
    assert "donates" in caplog.text
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    _, saved = checkpoint_state(path)
    assert_state_equal(saved, all_state(model))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="only TensorFlow's train step is traced once and "
                    "re-made for the gate")
def test_tensorflow_gate_is_in_the_traced_step_only_while_fitting(tmp_path):
    x, y = make_data(n=16)
    model = make_model()
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    traced = model.train_function
    inside = []

    class Inspect(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            inside.append(self.model.train_function is not traced)

    class Keep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            gated.add(self.model.train_function)

    gated = set()
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=2)
    for _ in range(2):
        model.fit(x, y, epochs=1, batch_size=4, verbose=0,
                  callbacks=[Inspect(), Keep(), cb])
        assert_left_as_found(model, traced)
    assert inside == [True] * 8
    # The second fit with the same callback reused the gated step: no
    # second trace.
    assert len(gated) == 1
