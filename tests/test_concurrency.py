"""Two trainings on one backup_dir: the second gets BackupDirLockedError and
writes nothing, whether it is another process or another thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import keras
import pytest

import fastbackup
from fastbackup.format import CheckpointReader
from fastbackup.snapshot import collect_variables
from fastbackup.stores.local import LocalStore
from tests.conftest import (
    all_state,
    assert_state_equal,
    make_data,
    make_model,
    worker_env,
)

HOLDER = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, sys.argv[2])
import keras
import fastbackup
from tests.conftest import make_data, make_model

class Pause(keras.callbacks.Callback):
    # Mid-training, with the lock held: tell the test, wait for it.
    def on_train_batch_end(self, batch, logs=None):
        if batch == 2 and not getattr(self, "done", False):
            self.done = True
            fastbackup_cb.wait_until_finished()
            sys.stdout.write("HOLDING\n")
            sys.stdout.flush()
            assert sys.stdin.readline().strip() == "go"

x, y = make_data(n=48)
model = make_model()
fastbackup_cb = fastbackup.BackupAndRestore(sys.argv[1], save_freq=1,
                                            delete_checkpoint=False)
model.fit(x, y, epochs=2, batch_size=8, verbose=0,
          callbacks=[fastbackup_cb, Pause()])
s = fastbackup_cb.stats
sys.stdout.write(f"DONE {s.saves} {s.last_durable[0]} {s.last_durable[1]} "
                 f"{s.last_durable[2]}\n")
"""


def _listing(d):
    return sorted(os.listdir(d))


def test_second_process_is_refused_and_writes_nothing(tmp_path):
    backup = str(tmp_path / "backup")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = worker_env()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, backup, root],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "HOLDING", holder.stderr.read()
        before = _listing(backup)
        assert LocalStore(backup).list_checkpoints()  # the holder has saved
        x, y = make_data(n=48)
        model = make_model()
        model.build((None, 6))
        model.optimizer.build(model.trainable_variables)
        untouched = all_state(model, metrics=False)
        cb = fastbackup.BackupAndRestore(backup, save_freq=1,
                                         delete_checkpoint=False)
        with pytest.raises(fastbackup.BackupDirLockedError) as info:
            model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
        error = info.value
        assert isinstance(error, OSError)
        assert f"pid {holder.pid}" in str(error) and backup in str(error)
        # Refused before anything was restored, trained or written.
        assert_state_equal(all_state(model, metrics=False), untouched)
        assert cb.restored_from is None
        assert _listing(backup) == before
        holder.stdin.write("go\n")
        holder.stdin.flush()
        out, err = holder.communicate(timeout=120)
        assert holder.returncode == 0 and "DONE" in out, err[-3000:]
        saves, last_step, last_epoch, last_batch = map(
            int, out.split("DONE")[1].split())
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    # Only the holder's files: its newest checkpoint, complete, the last one
    # it made, and its sequence numbers 0..saves-1 were all its own.
    [(step, path)] = LocalStore(backup).list_checkpoints()
    assert step == last_step == saves - 1
    with CheckpointReader(path) as reader:
        reader.verify()
        assert (reader.epoch, reader.batch) == (last_epoch, last_batch)
        # The end of its training: the last batch, or the end of the epoch.
        assert (reader.epoch, reader.batch) in ((1, 5), (2, 0))
    assert not [n for n in os.listdir(backup) if n.endswith(".tmp")]
    # Once the holder has exited, the lock is free.
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[cb])
    assert cb.restored_from == (last_step, last_epoch, last_batch)


def test_second_thread_is_refused_while_the_first_trains(tmp_path):
    backup = str(tmp_path / "backup")
    x, y = make_data(n=32)
    a_training = threading.Event()
    b_tried = threading.Event()
    outcome = {}

    class Gate(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0 and not a_training.is_set():
                a_training.set()
                assert b_tried.wait(120)

    model_a, model_b = make_model(), make_model()
    model_b.build((None, 6))
    model_b.optimizer.build(model_b.trainable_variables)
    untouched_b = all_state(model_b, metrics=False)
    cb_a = fastbackup.BackupAndRestore(backup, save_freq=1,
                                       delete_checkpoint=False)

    def train_a():
        try:
            model_a.fit(x, y, epochs=2, batch_size=8, verbose=0,
                        callbacks=[cb_a, Gate()])
            outcome["a"] = "done"
        except BaseException as e:  # reported below
            outcome["a"] = e
            b_tried.set()

    def train_b():
        assert a_training.wait(120)
        try:
            model_b.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
                fastbackup.BackupAndRestore(backup, save_freq=1)])
            outcome["b"] = "done"
        except BaseException as e:
            outcome["b"] = e
        finally:
            b_tried.set()

    threads = [threading.Thread(target=train_a), threading.Thread(target=train_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert outcome["a"] == "done", outcome
    assert isinstance(outcome["b"], fastbackup.BackupDirLockedError), outcome
    assert_state_equal(all_state(model_b, metrics=False), untouched_b)
    # The directory holds A's final state only, never B's.
    [(step, path)] = LocalStore(backup).list_checkpoints()
    assert step == cb_a.stats.last_durable[0] == cb_a.stats.saves - 1
    names = [n for n, _ in collect_variables(model_a)]
    expected = dict(zip(names, all_state(model_a)))
    with CheckpointReader(path) as reader:
        reader.verify()
        assert (reader.epoch, reader.batch) in ((1, 3), (2, 0))
        import numpy as np

        for entry in reader.entries:
            out = np.empty(entry.shape, entry.np_dtype)
            reader.read_tensor(entry, out)
            assert out.tobytes() == expected[entry.name].tobytes(), entry.name
