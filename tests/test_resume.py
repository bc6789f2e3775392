"""Exact mid-epoch resume (`resume_mid_epoch=True`) against an uninterrupted run."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import fastbackup
from fastbackup.format import CheckpointReader
from fastbackup.stores.local import LocalStore
from tests.conftest import InterruptAt, all_state, assert_state_equal

EPOCHS = 3
BATCH = 8
N = 40  # 5 batches per epoch


def _model():
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=3, decay_rate=0.7
    )
    model = keras.Sequential(
        [
            keras.layers.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3, seed=7),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
    return model


def _data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, 6)).astype("float32")
    return x, (x[:, :1] * 2 - x[:, 1:2]).astype("float32")


def _reference():
    keras.utils.set_random_seed(11)
    model = _model()
    x, y = _data()
    model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0)
    return model


class CountSteps(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.start = int(self.model.optimizer.iterations.numpy())

    def on_train_end(self, logs=None):
        self.end = int(self.model.optimizer.iterations.numpy())


@pytest.mark.parametrize(
    "stop",
    [(0, 2), (1, 4), (2, 1)],
    ids=["mid-epoch", "epoch-boundary", "later-epoch"],
)
def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path, stop):
    reference = all_state(_reference(), metrics=False)
    keras.utils.set_random_seed(11)
    x, y = _data()
    model = _model()
    with pytest.raises(RuntimeError, match="Interrupting"):
        model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False,
                  verbose=0, callbacks=[
                      fastbackup.BackupAndRestore(
                          tmp_path, save_freq=1, resume_mid_epoch=True,
                          delete_checkpoint=False),
                      InterruptAt(*stop)])
    model.optimizer.iterations.numpy()
    keras.utils.set_random_seed(999)  # the resumed run must not depend on it
    fresh = _model()
    fresh.build((None, 6))
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=1,
                                     resume_mid_epoch=True)
    steps = CountSteps()
    fresh.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[cb, steps])
    _, epoch, batch = cb.restored_from
    done = epoch * (N // BATCH) + batch + 1
    assert steps.start == done
    # Exactly the remaining batches were trained, and the result is the
    # uninterrupted run's, bit for bit.
    assert steps.end - steps.start == EPOCHS * (N // BATCH) - done
    assert_state_equal(all_state(fresh, metrics=False), reference)


def test_resume_mid_epoch_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBACKUP_RESUME_MID_EPOCH", "1")
    assert fastbackup.BackupAndRestore(tmp_path).resume_mid_epoch
    monkeypatch.setenv("FASTBACKUP_RESUME_MID_EPOCH", "0")
    assert not fastbackup.BackupAndRestore(tmp_path).resume_mid_epoch
    assert fastbackup.BackupAndRestore(tmp_path, resume_mid_epoch=True).resume_mid_epoch


def test_default_replays_the_epoch_like_keras(tmp_path):
    x, y = _data()
    model = _model()
    with pytest.raises(RuntimeError):
        model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False,
                  verbose=0, callbacks=[
                      fastbackup.BackupAndRestore(tmp_path, save_freq=1),
                      InterruptAt(1, 2)])
    fresh = _model()
    fresh.build((None, 6))
    steps = CountSteps()
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=1)
    fresh.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[cb, steps])
    # The newest durable checkpoint is mid-epoch (its epoch, or epoch 0 if
    # the last saves were coalesced); that epoch is replayed from batch 0.
    _, epoch, batch = cb.restored_from
    assert epoch <= 1 and steps.start == epoch * 5 + batch + 1
    assert steps.end - steps.start == (EPOCHS - epoch) * 5


class RecordBatches(keras.callbacks.Callback):
    """Records every batch hook call: (hook, epoch, batch, logs keys)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []
        self.logs: list[dict] = []
        self._epoch = -1

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.calls.append(("begin", self._epoch, batch))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("end", self._epoch, batch))
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("save_freq", [1, 3])
def test_other_callbacks_see_only_the_batches_trained(tmp_path, save_freq):
    x, y = _data()
    batches = N // BATCH
    model = _model()
    with pytest.raises(RuntimeError, match="Interrupting"):
        model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False,
                  verbose=0, callbacks=[
                      fastbackup.BackupAndRestore(
                          tmp_path, save_freq=save_freq,
                          resume_mid_epoch=True, delete_checkpoint=False),
                      InterruptAt(1, 3)])
    fresh = _model()
    fresh.build((None, 6))
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=save_freq,
                                     resume_mid_epoch=True,
                                     delete_checkpoint=False)
    # The recorder is both after and before fastbackup in the list: the
    # order of callbacks must not matter.
    before, after = RecordBatches(), RecordBatches()
    steps = CountSteps()
    fresh.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[before, cb, after, steps])
    _, epoch, batch = cb.restored_from
    assert epoch == 1 and batch < batches - 1
    trained = [(epoch, b) for b in range(batch + 1, batches)] + [
        (e, b) for e in range(epoch + 1, EPOCHS) for b in range(batches)
    ]
    expected = [
        (hook, e, b) for e, b in trained for hook in ("begin", "end")
    ]
    assert steps.end - steps.start == len(trained)
    for recorder in (before, after):
        assert recorder.calls == expected
        assert all("loss" in logs for logs in recorder.logs)
    # The next save fell due save_freq batches after the checkpoint's, as
    # in an uninterrupted run.
    checkpoints = LocalStore(str(tmp_path)).list_checkpoints()
    with CheckpointReader(checkpoints[0][1]) as reader:
        last = (reader.epoch, reader.batch)
    assert last == (EPOCHS - 1, batches - 1)


def test_resume_hides_nothing_once_the_epoch_is_over(tmp_path):
    # A callback reused for a second fit: its first fit's hiding must not
    # leak into the second one.
    x, y = _data()
    model = _model()
    with pytest.raises(RuntimeError, match="Interrupting"):
        model.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0,
                  callbacks=[fastbackup.BackupAndRestore(
                      tmp_path, save_freq=1, resume_mid_epoch=True),
                      InterruptAt(0, 2)])
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=1,
                                     resume_mid_epoch=True)
    recorder = RecordBatches()
    model.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[cb, recorder])
    assert cb.restored_from[1:] == (0, 2)
    recorder.calls.clear()
    model.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[cb, recorder])
    assert [c for c in recorder.calls if c[0] == "end"] == [
        ("end", 0, b) for b in range(N // BATCH)
    ]


# Issue 21: the save points, dtypes and models that broke a resume. -----------


def _metrics_model():
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                  metrics=["mae"])
    return model


class InterruptValidation(keras.callbacks.Callback):
    """Raises when the validation of epoch `epoch` begins: the job dies
    after the epoch's last batch was saved, before its end."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch
        self._current = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_test_begin(self, logs=None):
        if self._current == self.epoch:
            raise RuntimeError("Interrupting!")


def _fit_metrics_model(model, callbacks):
    x, y = _data()
    return model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False,
                     verbose=0, validation_data=(x[:8], y[:8]),
                     callbacks=callbacks).history


def test_checkpoint_at_an_epochs_last_batch_resumes_as_its_end(tmp_path):
    keras.utils.set_random_seed(11)
    reference = _metrics_model()
    history = _fit_metrics_model(reference, [])
    keras.utils.set_random_seed(11)
    model = _metrics_model()
    with pytest.raises(RuntimeError, match="Interrupting"):
        _fit_metrics_model(model, [
            fastbackup.BackupAndRestore(tmp_path, save_freq=N // BATCH,
                                        resume_mid_epoch=True),
            InterruptValidation(1)])
    fresh = _metrics_model()
    callback = fastbackup.BackupAndRestore(tmp_path, save_freq=N // BATCH,
                                           resume_mid_epoch=True)
    steps = CountSteps()
    resumed = _fit_metrics_model(fresh, [callback, steps])
    assert callback.restored_from[1:] == (1, N // BATCH - 1)
    # Epoch 1 was trained whole: the fit goes on at epoch 2, and every
    # epoch it reports has its loss and metrics (a skip of every batch of
    # epoch 1 reported only val_* for it, or crashed on TensorFlow).
    assert steps.end - steps.start == N // BATCH
    for key, values in history.items():
        assert resumed[key] == values[2:], key
    assert_state_equal(all_state(fresh, metrics=False),
                       all_state(reference, metrics=False))


def test_mid_epoch_resume_continues_every_compiled_metric(tmp_path):
    # On TensorFlow the compiled metrics are built by the first step's
    # trace, after the restore: their saved totals must still continue.
    keras.utils.set_random_seed(11)
    history = _fit_metrics_model(_metrics_model(), [])
    keras.utils.set_random_seed(11)
    with pytest.raises(RuntimeError, match="Interrupting"):
        _fit_metrics_model(_metrics_model(), [
            fastbackup.BackupAndRestore(tmp_path, save_freq=1,
                                        resume_mid_epoch=True),
            InterruptAt(1, 2)])
    fresh = _metrics_model()
    callback = fastbackup.BackupAndRestore(tmp_path, save_freq=1,
                                           resume_mid_epoch=True)
    resumed = _fit_metrics_model(fresh, [callback])
    assert callback.restored_from[1:] == (1, 2)
    for key, values in history.items():
        assert resumed[key] == values[1:], key


@pytest.fixture
def float64():
    keras.backend.set_floatx("float64")
    try:
        yield
    finally:
        keras.backend.set_floatx("float32")


@pytest.mark.usefixtures("float64")
def test_float64_and_int64_state_resumes(tmp_path):
    # On JAX without x64 the arrays are float32 and int32: the checkpoint
    # holds what is stored, and the restore compares against that.
    x, y = _data()
    x, y = x.astype("float64"), y.astype("float64")

    def model_with_counter():
        model = _model()
        model.counter = keras.Variable(7, dtype="int64", trainable=False)
        return model

    keras.utils.set_random_seed(11)
    reference = model_with_counter()
    reference.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False,
                  verbose=0)
    keras.utils.set_random_seed(11)
    model = model_with_counter()
    with pytest.raises(RuntimeError, match="Interrupting"):
        model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False,
                  verbose=0, callbacks=[
                      fastbackup.BackupAndRestore(tmp_path, save_freq=1,
                                                  resume_mid_epoch=True),
                      InterruptAt(1, 2)])
    fresh = model_with_counter()
    callback = fastbackup.BackupAndRestore(tmp_path, save_freq=1,
                                           resume_mid_epoch=True)
    fresh.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[callback])
    assert callback.restored_from[1:] == (1, 2)
    assert_state_equal(all_state(fresh, metrics=False),
                       all_state(reference, metrics=False))


class TwoBlocks(keras.Model):
    """A subclassed model whose `build(shape)` leaves its sublayers unbuilt
    (Keras warns): they are built by the first call."""

    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(8, activation="relu")
        self.second = keras.layers.Dense(1)

    def call(self, x):
        return self.second(self.first(x))


@pytest.mark.filterwarnings("ignore:`build\\(\\)` was called")
def test_first_fit_of_a_model_with_unbuilt_sublayers_trains_like_keras(
    tmp_path
):
    x, y = _data()
    runs = []
    for callback in (
        keras.callbacks.BackupAndRestore(str(tmp_path / "keras")),
        fastbackup.BackupAndRestore(tmp_path / "fastbackup"),
    ):
        keras.utils.set_random_seed(11)
        model = TwoBlocks()
        model.build((None, 6))
        model.compile(optimizer="adam", loss="mse")
        history = model.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False,
                            verbose=0, callbacks=[callback]).history
        runs.append((history, all_state(model, metrics=False)))
    (keras_history, keras_state), (history, state) = runs
    assert history == keras_history
    assert_state_equal(state, keras_state)
