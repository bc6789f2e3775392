"""End-to-end tests of `fastbackup.BackupAndRestore` with real Keras models."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest

import fastbackup
from fastbackup import restore
from fastbackup import writer as writer_lib
from fastbackup.format import CheckpointReader
from fastbackup.stores.local import LocalStore
from tests.conftest import (
    TENSOR_BYTE,
    InterruptAt,
    all_state,
    assert_state_equal,
    flip_byte,
    fresh_model,
    make_data,
    make_model,
)


class CountBatches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0
        self.epochs: list[int] = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


# Arguments -------------------------------------------------------------------


@pytest.mark.parametrize("backup_dir", [None, ""])
def test_empty_backup_dir_raises(backup_dir):
    with pytest.raises(ValueError, match="Empty `backup_dir` argument passed"):
        fastbackup.BackupAndRestore(backup_dir)


@pytest.mark.parametrize("save_freq", ["batch", 1.5, None, "1"])
def test_invalid_save_freq_raises_keras_error(tmp_path, save_freq):
    # Refused by Keras too, with this very message.
    message = (
        "Invalid value for argument `save_freq`. "
        f"Received: save_freq={save_freq}. "
        "Expected either 'epoch' or an integer value."
    )
    for callback in (keras.callbacks.BackupAndRestore,
                     fastbackup.BackupAndRestore):
        with pytest.raises(ValueError) as raised:
            callback(str(tmp_path), save_freq=save_freq)
        assert str(raised.value) == message


@pytest.mark.parametrize("save_freq", [-1, -3])
def test_negative_save_freq_raises(tmp_path, save_freq):
    # Keras accepts it and saves after every batch; a difference listed in
    # docs/migrating.md.
    with pytest.raises(ValueError, match=(
            f"Invalid value for argument `save_freq`. Received: "
            f"save_freq={save_freq}. A negative number of batches is not a "
            "frequency: use False for no periodic saves, or 1 to save after "
            "every batch.")):
        fastbackup.BackupAndRestore(tmp_path, save_freq=save_freq)


def test_signature_matches_keras():
    import inspect

    ours = inspect.signature(fastbackup.BackupAndRestore).parameters
    theirs = inspect.signature(keras.callbacks.BackupAndRestore).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, param in theirs.items():
        assert ours[name].default == param.default
    # Extra arguments are keyword-only and keep Keras's behaviour by default.
    for name in list(ours)[len(theirs):]:
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY


def test_async_safe_only_without_batch_saves(tmp_path):
    assert fastbackup.BackupAndRestore(tmp_path).async_safe
    assert fastbackup.BackupAndRestore(tmp_path, save_freq=False).async_safe
    assert not fastbackup.BackupAndRestore(tmp_path, save_freq=3).async_safe


# Keras's documented behaviour ----------------------------------------------


def test_keras_doc_example_runs_six_more_epochs(tmp_path):
    backup = str(tmp_path / "backup")

    class InterruptingCallback(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 4:
                raise RuntimeError("Interrupting!")

    callback = fastbackup.BackupAndRestore(backup_dir=backup)
    model = keras.models.Sequential([keras.layers.Dense(10)])
    model.compile(keras.optimizers.SGD(), loss="mse")
    model.build(input_shape=(None, 20))
    try:
        model.fit(np.arange(100).reshape(5, 20), np.zeros(5), epochs=10,
                  batch_size=1, callbacks=[callback, InterruptingCallback()],
                  verbose=0)
    except:  # noqa: E722 - verbatim from the Keras documentation
        pass
    history = model.fit(np.arange(100).reshape(5, 20), np.zeros(5),
                        epochs=10, batch_size=1, callbacks=[callback],
                        verbose=0)
    assert len(history.history["loss"]) == 6
    # Successful fit with delete_checkpoint=True removes the backup.
    assert not os.path.exists(backup)


def test_new_callback_and_fresh_model_resume_same_epoch(tmp_path):
    x, y = make_data()
    model = make_model()
    with pytest.raises(RuntimeError, match="Interrupting"):
        model.fit(x, y, epochs=6, batch_size=8, verbose=0, callbacks=[
            fastbackup.BackupAndRestore(tmp_path), InterruptAt(epoch=3)])
    # Keras reset the metrics before the interrupted epoch began.
    expected = all_state(model, metrics=False)
    fresh = fresh_model()
    counter = CountBatches()
    cb = fastbackup.BackupAndRestore(tmp_path, delete_checkpoint=False)
    history = fresh.fit(x, y, epochs=3, batch_size=8, verbose=0,
                        callbacks=[cb, counter])
    # Restored at epoch 3 of 3: nothing left to train; state is bitwise equal.
    assert counter.batches == 0 and history.history == {}
    assert_state_equal(all_state(fresh, metrics=False), expected)


def test_bitwise_restore_of_weights_optimizer_and_metrics(tmp_path):
    x, y = make_data()
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path, delete_checkpoint=False)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    expected = all_state(model)
    # The optimizer really has state (iterations, moments) and metrics too.
    assert int(model.optimizer.iterations.numpy()) == 8
    fresh = fresh_model()
    fresh.fit(x, y, epochs=2, batch_size=8, verbose=0,
              callbacks=[fastbackup.BackupAndRestore(tmp_path,
                                                     delete_checkpoint=False)])
    assert_state_equal(all_state(fresh), expected)


@pytest.mark.parametrize("save_freq", [3, 0, True])
def test_integer_save_freq_counts_like_keras(tmp_path, save_freq):
    # 0 and True are integers to Keras: every batch is due.
    saved: list[tuple[int, int]] = []

    class Spy(fastbackup.BackupAndRestore):
        def _save(self, epoch, batch, block, due=True, **kwargs):
            saved.append((epoch, batch))
            super()._save(epoch, batch, block=True, due=due, **kwargs)

    class KerasSpy(keras.callbacks.BackupAndRestore):
        def _save_model(self):
            keras_saved.append((self._current_epoch, self._last_batch_seen))

    keras_saved: list[tuple[int, int]] = []
    x, y = make_data(n=40)
    # The torch backend only supports steps_per_execution=1.
    for spe in (1,) if keras.backend.backend() == "torch" else (1, 2):
        saved.clear()
        keras_saved.clear()
        for cb in (Spy(tmp_path / "a", save_freq=save_freq),
                   KerasSpy(str(tmp_path / "k"), save_freq=save_freq)):
            model = make_model()
            model.compile(optimizer="sgd", loss="mse", steps_per_execution=spe)
            model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[cb])
        assert saved == keras_saved and len(saved) >= 4, (spe, saved)
        if save_freq != 3 and spe == 1:
            assert len(saved) == 3 * 5


def test_epoch_saves_record_next_epoch(tmp_path):
    x, y = make_data()
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path, delete_checkpoint=False)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[cb])
    [(step, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    with CheckpointReader(path) as reader:
        assert (reader.epoch, reader.batch) == (3, 0)
    assert cb.stats.saves == 3 and step == 2


def test_mid_epoch_checkpoint_replays_its_epoch_like_keras(tmp_path):
    # Keras's own test: interrupted after 2 of 3 batches of epoch 0 with
    # save_freq=1, resumed for 5 epochs: 2 + 15 batches trained in all.
    x, y = make_data(n=24)
    model = make_model()
    first = CountBatches()
    with pytest.raises(RuntimeError):
        model.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=[
            fastbackup.BackupAndRestore(tmp_path, save_freq=1), first,
            InterruptAt(epoch=0, batch=1)])
    second = CountBatches()
    model.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(tmp_path, save_freq=1), second])
    assert first.batches + second.batches == 2 + 15
    assert second.epochs == [0, 1, 2, 3, 4]


def test_save_freq_false_never_saves(tmp_path):
    x, y = make_data()
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=False,
                                     delete_checkpoint=False)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    assert LocalStore(str(tmp_path)).list_checkpoints() == []
    assert cb.stats.saves == 0


def test_delete_checkpoint_false_keeps_backup(tmp_path):
    x, y = make_data()
    model = make_model()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(tmp_path / "b", delete_checkpoint=False)])
    assert len(LocalStore(str(tmp_path / "b")).list_checkpoints()) == 1


def test_interrupted_fit_keeps_backup(tmp_path):
    x, y = make_data()
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path / "b")
    with pytest.raises(RuntimeError):
        model.fit(x, y, epochs=4, batch_size=8, verbose=0, callbacks=[
            cb, InterruptAt(2)])
    # The last save may still be in flight when fit raises.
    cb.wait_until_finished()
    [(step, path)] = LocalStore(str(tmp_path / "b")).list_checkpoints()
    with CheckpointReader(path) as reader:
        assert reader.epoch == 2


def test_unbuilt_model_raises_when_restoring(tmp_path):
    x, y = make_data()
    model = make_model()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(tmp_path, delete_checkpoint=False)])
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    unbuilt.compile(optimizer="sgd", loss="mse")
    cb = fastbackup.BackupAndRestore(tmp_path)
    cb.set_model(unbuilt)
    with pytest.raises(ValueError, match="must be built"):
        cb.on_train_begin()


def test_mismatched_model_is_refused_without_touching_it(tmp_path):
    x, y = make_data()
    model = make_model(units=8)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(tmp_path, delete_checkpoint=False)])
    other = fresh_model(units=5)
    other.optimizer.build(other.trainable_variables)
    before = all_state(other)
    with pytest.raises(fastbackup.CheckpointMismatchError,
                       match=r"model\.0 \(.*kernel\).*\(6, 5\)"):
        other.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
            fastbackup.BackupAndRestore(tmp_path)])
    assert_state_equal(all_state(other), before)


def _train_two_checkpoints(tmp_path):
    x, y = make_data()
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path, double_checkpoint=True,
                                     delete_checkpoint=False)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    previous = all_state(model)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    ckpts = LocalStore(str(tmp_path)).list_checkpoints()
    assert [s for s, _ in ckpts] == [1, 0]
    return x, y, ckpts, previous


def test_double_checkpoint_restores_previous_when_newest_damaged(tmp_path):
    x, y, ckpts, previous = _train_two_checkpoints(tmp_path)
    flip_byte(ckpts[0][1], TENSOR_BYTE)
    fresh = fresh_model()
    cb = fastbackup.BackupAndRestore(tmp_path, double_checkpoint=True,
                                     delete_checkpoint=False)
    counter = CountBatches()
    fresh.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb, counter])
    assert cb.restored_from == (0, 1, 0)
    assert counter.batches == 0
    assert_state_equal(all_state(fresh), previous)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_raises_without_double_checkpoint(tmp_path, damage):
    x, y = make_data()
    model = make_model()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(tmp_path, delete_checkpoint=False)])
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    if damage == "flip":
        flip_byte(path, TENSOR_BYTE)
    else:
        os.truncate(path, os.path.getsize(path) // 2)
    fresh = fresh_model()
    fresh.optimizer.build(fresh.trainable_variables)
    before = all_state(fresh)
    with pytest.raises(fastbackup.CheckpointCorruptError, match=path):
        fresh.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
            fastbackup.BackupAndRestore(tmp_path)])
    assert_state_equal(all_state(fresh), before)


# The asynchronous pipeline ---------------------------------------------------


def test_snapshot_is_isolated_from_training_that_goes_on(tmp_path, monkeypatch):
    x, y = make_data()
    model = make_model()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    release = threading.Event()
    writing = threading.Event()
    real_commit = LocalStore.commit

    def slow_commit(*args, **kwargs):
        writing.set()
        assert release.wait(30)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(LocalStore, "commit", slow_commit)
    cb = fastbackup.BackupAndRestore(tmp_path, delete_checkpoint=False)
    cb.set_model(model)
    cb.on_train_begin()
    cb._save(epoch=1, batch=0, block=True)
    at_snapshot = all_state(model)
    assert writing.wait(30)
    # Training goes on while the write is in flight.
    for _ in range(3):
        model.train_on_batch(x[:8], y[:8])
    assert cb._writer.busy()
    after = all_state(model)
    assert any(a.tobytes() != b.tobytes() for a, b in zip(at_snapshot, after))
    release.set()
    cb.wait_until_finished()
    fresh = fresh_model()
    cb2 = fastbackup.BackupAndRestore(tmp_path, delete_checkpoint=False)
    cb2.set_model(fresh)
    cb2.on_train_begin()
    assert_state_equal(all_state(fresh), at_snapshot)


def test_writer_error_is_raised_on_training_thread(tmp_path, monkeypatch):
    def failing_commit(store, step, encoded, sync, **kwargs):
        raise OSError(28, "No space left on device", store.location)

    monkeypatch.setattr(LocalStore, "commit", failing_commit)
    x, y = make_data()
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=1)
    with pytest.raises(fastbackup.BackupWriteError, match="No space left"):
        model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[cb])
    assert isinstance(cb.stats, object) and cb.stats.saves == 0


def test_writer_error_reaches_wait_until_finished(tmp_path, monkeypatch):
    def failing_commit(store, step, encoded, sync, **kwargs):
        raise OSError(5, "Input/output error", store.location)

    monkeypatch.setattr(LocalStore, "commit", failing_commit)
    model = make_model()
    model.build((None, 6))
    cb = fastbackup.BackupAndRestore(tmp_path)
    cb.set_model(model)
    cb.on_train_begin()
    cb._save(0, 0, block=True)
    with pytest.raises(fastbackup.BackupWriteError) as info:
        cb.wait_until_finished()
    assert info.value.errno == 5 and isinstance(info.value.__cause__, OSError)


def test_writer_error_can_be_a_warning(tmp_path, monkeypatch, caplog):
    def failing_commit(store, step, encoded, sync, **kwargs):
        raise OSError(28, "No space left on device", store.location)

    monkeypatch.setattr(LocalStore, "commit", failing_commit)
    monkeypatch.setenv("FASTBACKUP_ON_ERROR", "warn")
    x, y = make_data()
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=1)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    assert len(history.history["loss"]) == 2
    assert "training goes on" in caplog.text
    assert cb.stats.saves == 0


@pytest.fixture
def held_commits(monkeypatch):
    """Holds every checkpoint commit until the returned event is set."""
    release = threading.Event()
    real_commit = LocalStore.commit

    def slow_commit(*args, **kwargs):
        release.wait(30)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(LocalStore, "commit", slow_commit)
    yield release
    release.set()


def test_busy_writer_coalesces_instead_of_blocking(tmp_path, monkeypatch,
                                                    held_commits):
    # One host buffer, as a state above the automatic threshold gets.
    monkeypatch.setenv("FASTBACKUP_PENDING_SNAPSHOTS", "0")
    release = held_commits
    x, y = make_data(n=64)
    model = make_model()

    class Release(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            release.set()

    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=1,
                                     delete_checkpoint=False)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb, Release()])
    # 8 saves fell due while the first write was held: none blocked the
    # step, the last due state was written at the end.
    assert cb.stats.coalesced >= 6
    assert cb.stats.saves == 2
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    with CheckpointReader(path) as reader:
        # The save that fell due last was made at the end of training,
        # after the epoch completed.
        assert (reader.epoch, reader.batch) == (1, 0)


def test_pending_snapshot_writes_flush_at_interpreter_exit(tmp_path):
    script = f"""
import os, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, keras, fastbackup
from fastbackup.stores.local import LocalStore
real = LocalStore.commit
def slow(*a, **k):
    time.sleep(1.0)
    return real(*a, **k)
LocalStore.commit = slow
model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(2)])
model.compile("adam", "mse")
cb = fastbackup.BackupAndRestore({str(tmp_path)!r})
class Boom(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise SystemExit(3)
model.fit(np.ones((4, 4)), np.ones((4, 2)), epochs=3, verbose=0,
          callbacks=[cb, Boom()])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    with CheckpointReader(path) as reader:
        assert reader.epoch == 1
        reader.verify()


def test_second_callback_on_same_dir_in_another_thread_is_refused(tmp_path):
    model = make_model()
    model.build((None, 6))
    first = fastbackup.BackupAndRestore(tmp_path)
    first.set_model(model)
    first.on_train_begin()
    errors = []

    def other():
        cb = fastbackup.BackupAndRestore(tmp_path)
        cb.set_model(model)
        try:
            cb.on_train_begin()
        except fastbackup.BackupDirLockedError as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1 and str(tmp_path) in str(errors[0])
    first.on_train_end()


def test_summary_line_only_when_verbose(tmp_path, capsys):
    x, y = make_data()
    model = make_model()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(tmp_path / "quiet")])
    assert "fastbackup:" not in capsys.readouterr().out
    cb = fastbackup.BackupAndRestore(tmp_path / "loud", delete_checkpoint=False)
    model.fit(x, y, epochs=2, batch_size=8, verbose=2, callbacks=[cb])
    [line] = [l for l in capsys.readouterr().out.splitlines()
              if l.startswith("fastbackup:")]
    assert re.fullmatch(
        r"fastbackup: 2 checkpoint\(s\) written \(\d+\.\d kB\); training "
        r"paused \d+\.\d ms per save \(median\); newest checkpoint: step 1 "
        r"\(epoch 2, batch 0\) in " + re.escape(str(tmp_path / "loud")),
        line), line
    # Nothing was coalesced: the line does not mention it.


def test_summary_names_no_checkpoint_once_the_backup_is_deleted(tmp_path,
                                                               capsys):
    x, y = make_data()
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path / "b", save_freq=1)
    model.fit(x, y, epochs=2, batch_size=8, verbose=2, callbacks=[cb])
    assert not (tmp_path / "b").exists()
    [line] = [l for l in capsys.readouterr().out.splitlines()
              if l.startswith("fastbackup:")]
    assert line.endswith("; backup deleted at the end of training "
                         "(delete_checkpoint=True)"), line
    assert not re.search(r"step \d", line) and "newest" not in line, line


def _model_without_input():
    model = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


@pytest.mark.parametrize("save_freq", ["epoch", 2])
def test_model_without_input_is_refused_or_trained_as_keras_does(
        tmp_path, save_freq):
    # TensorFlow's `fit` builds such a model only in its first step, after
    # `on_train_begin`, where Keras's callback refuses it, checkpoint or
    # not; JAX's and torch's `fit` build it before. The first run must
    # fail as Keras's does, not train and fail the resume.
    x, y = make_data()
    keras_model, keras_count = _model_without_input(), CountBatches()
    try:
        keras_model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
            keras.callbacks.BackupAndRestore(str(tmp_path / "keras"),
                                             save_freq=save_freq),
            keras_count])
    except ValueError as e:
        keras_error: ValueError | None = e
    else:
        keras_error = None
    assert (keras_error is not None) == (keras.backend.backend() == "tensorflow")
    model = _model_without_input()
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=save_freq,
                                     delete_checkpoint=False)
    if keras_error is not None:
        count = CountBatches()
        with pytest.raises(ValueError) as raised:
            model.fit(x, y, epochs=2, batch_size=8, verbose=0,
                      callbacks=[cb, count])
        assert str(raised.value).replace(str(model), "M") == str(
            keras_error).replace(str(keras_model), "M")
        assert count.batches == keras_count.batches == 0
        assert list(tmp_path.iterdir()) == []  # nothing written
        return
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    assert cb.stats.saves >= 1
    expected = all_state(model)
    again = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(1)])
    again.compile(optimizer="adam", loss="mse")
    again.build((None, 6))
    cb2 = fastbackup.BackupAndRestore(tmp_path, save_freq=save_freq,
                                      delete_checkpoint=False)
    again.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb2])
    assert len(expected) >= 4 and cb2.restored_from is not None
    if save_freq == "epoch":
        # Restored after the last epoch: nothing left to train.
        assert_state_equal(all_state(again, metrics=False),
                           all_state(model, metrics=False))


def test_small_state_takes_every_due_save_at_once(tmp_path, held_commits):
    # The first write is held; every later due save must still be
    # snapshotted when it falls due (into the second buffer), so the state
    # of the last batch before an exception is the one written.
    release = held_commits
    x, y = make_data(n=64)
    model = make_model()
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=1)
    recorder = RecordAt(0, 2)
    with pytest.raises(RuntimeError, match="Interrupting"):
        model.fit(x, y, epochs=2, batch_size=8, verbose=0,
                  callbacks=[cb, recorder, InterruptAt(0, 2)])
    assert cb._get_writer().buffers == 2
    release.set()
    cb.wait_until_finished()
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    with CheckpointReader(path) as reader:
        assert (reader.epoch, reader.batch) == (0, 2)
        saved = [v for _, v in restore.read_state(reader, model)]
    assert_state_equal(saved, recorder.state)


class RecordAt(keras.callbacks.Callback):
    """Keeps a copy of the whole state at the end of one batch."""

    def __init__(self, epoch: int, batch: int):
        super().__init__()
        self.at = (epoch, batch)
        self._epoch = 0
        self.state: list[np.ndarray] | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self._epoch, batch) == self.at:
            self.state = all_state(self.model)


@pytest.mark.parametrize("pending, state_bytes, buffers", [
    (None, 1 << 10, 2),
    (None, writer_lib.AUTO_SECOND_BUFFER_BYTES, 2),
    (None, writer_lib.AUTO_SECOND_BUFFER_BYTES + 1, 1),
    (0, 1 << 10, 1),
    (1, 1 << 30, 2),
])
def test_pool_size(pending, state_bytes, buffers):
    assert writer_lib.pool_size(pending, state_bytes) == buffers


def test_save_per_batch_interrupted_restores_that_very_save(tmp_path):
    # Keras restores the save made just before the exception; so must we,
    # without waiting for the writer between steps.
    x, y = make_data(n=64)
    model = make_model()
    recorder = RecordAt(1, 2)
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=1)
    with pytest.raises(RuntimeError, match="Interrupting"):
        model.fit(x, y, epochs=3, batch_size=8, verbose=0,
                  callbacks=[cb, recorder, InterruptAt(1, 2)])
    fresh = fresh_model()
    cb2 = fastbackup.BackupAndRestore(tmp_path, save_freq=1)
    restored = RecordAtTrainBegin()
    # epochs=1 < the restored epoch: nothing trains after the restore.
    fresh.fit(x, y, epochs=1, batch_size=8, verbose=0,
              callbacks=[cb2, restored])
    assert cb2.restored_from[1:] == (1, 2)
    assert_state_equal(restored.state, recorder.state)


class RecordAtTrainBegin(keras.callbacks.Callback):
    """Keeps a copy of the whole state as `fit` begins (after a restore)."""

    def on_train_begin(self, logs=None):
        self.state = all_state(self.model)


@pytest.mark.parametrize("save_freq, interrupt, mid, continues", [
    # Saved at the end of epoch 0 (recorded as epoch 1, batch 0).
    ("epoch", (1,), False,
     "training continues at epoch 1 (Epoch 2/3)"),
    # Saved after batch 1 of epoch 1: replayed from batch 0, as Keras does.
    (1, (1, 1), False,
     ("training continues at epoch 1 (Epoch 2/3), batch 0: a mid-epoch "
      "checkpoint replays its epoch, as with Keras (resume_mid_epoch=True "
      "skips the batches already trained)")),
    (1, (1, 1), True,
     "training continues at epoch 1 (Epoch 2/3), batch 2"),
], ids=["epoch-end", "mid-epoch-replayed", "mid-epoch-resumed"])
@pytest.mark.parametrize("verbose", [0, 2])
def test_resume_is_reported_once(tmp_path, capsys, caplog, save_freq,
                                 interrupt, mid, continues, verbose):
    x, y = make_data()
    model = make_model()
    with pytest.raises(RuntimeError, match="Interrupting"):
        model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[
            fastbackup.BackupAndRestore(tmp_path, save_freq=save_freq),
            InterruptAt(*interrupt)])
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    capsys.readouterr()
    caplog.set_level("INFO", logger="fastbackup")
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=save_freq,
                                     resume_mid_epoch=mid)
    model.fit(x, y, epochs=3, batch_size=8, verbose=verbose, callbacks=[cb])
    position = "epoch 1, batch 1" if save_freq == 1 else "epoch 1, batch 0"
    message = f"resumed from {path} ({position}); {continues}"
    assert [r.getMessage() for r in caplog.records
            if r.name == "fastbackup" and "resumed" in r.getMessage()
            ] == [message]
    console = [l for l in capsys.readouterr().out.splitlines()
               if "resumed" in l]
    assert console == ([f"fastbackup: {message}"] if verbose else [])
