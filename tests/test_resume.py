"""Exact mid-epoch resume (`resume_mid_epoch=True`) against an uninterrupted run."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import fastbackup
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
