"""Subprocess side of tests/test_preemption.py: training that gets SIGTERM.

    python tests/preempt_worker.py MODE BACKUP_DIR PROGRESS_FILE

Prints one JSON line (prefixed "RESULT ") describing what happened. Modes:

- "self": SIGTERM handling from FASTBACKUP_HANDLE_SIGTERM=1; the process
  sends itself SIGTERM just before batch 3 of epoch 1 runs; no previous
  Python handler (SIG_DFL).
- "external": `handle_sigterm=True`; a previous Python handler is installed
  before `fit`; the test process sends SIGTERM at a moment of its choosing.
- "chain": previous handler semantics across fits: SIGTERM after a fit
  that raised, during a resumed fit with the same callback, and after the
  last step of a fit.
- "in_step": `handle_sigterm=True`; the data pipeline sends SIGTERM while
  the trainer fetches batch 3 of epoch 1. On JAX and torch that fetch runs
  on the main thread inside the train step, after the JAX trainer has read
  the state it is about to donate, so the handler runs mid-step.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fastbackup  # noqa: E402
from fastbackup.format import CheckpointReader  # noqa: E402
from fastbackup.stores.local import LocalStore  # noqa: E402

BATCH = 8
SAMPLES = 64
STEPS_PER_EPOCH = SAMPLES // BATCH


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    return x, x.sum(axis=1, keepdims=True).astype("float32")


def model():
    keras.utils.set_random_seed(3)
    m = keras.Sequential([keras.layers.Input((6,)), keras.layers.Dense(8),
                          keras.layers.Dense(1)])
    m.compile(optimizer="adam", loss="mse")
    return m


def checkpoints(backup):
    out = []
    for step, path in LocalStore(backup).list_checkpoints():
        with CheckpointReader(path) as reader:
            reader.verify()
            out.append([step, reader.epoch, reader.batch,
                        reader.meta.get("extra", {}).get("position")])
    return out


class Progress(keras.callbacks.Callback):
    """Counts steps completed, in memory and in a file the test can read."""

    def __init__(self, path):
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.epoch = 0
        self.steps = 0
        self.batches_seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.steps = self.epoch * STEPS_PER_EPOCH + batch + 1
        self.batches_seen.append([self.epoch, batch])
        os.pwrite(self.fd, struct.pack("<q", self.steps), 0)


class SignalSelf(keras.callbacks.Callback):
    def __init__(self, epoch, batch=None, at="batch_begin"):
        super().__init__()
        self.target = (epoch, batch)
        self.at = at
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.at == "batch_begin" and (self.epoch, batch) == self.target:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_epoch_end(self, epoch, logs=None):
        if self.at == "epoch_end" and epoch == self.target[0]:
            os.kill(os.getpid(), signal.SIGTERM)


class UserHandler:
    """A previous SIGTERM handler, as a job's own code would install."""

    def __init__(self, backup, progress):
        self.backup = backup
        self.progress = progress
        self.calls = []

    def __call__(self, signum, frame):
        # What is durable when the chained handler runs.
        self.calls.append({
            "steps": self.progress.steps if self.progress else None,
            "checkpoints": checkpoints(self.backup)
            if os.path.isdir(self.backup) else None,
        })


def mode_self(backup, progress_path):
    x, y = data()
    m = model()
    progress = Progress(progress_path)
    cb = fastbackup.BackupAndRestore(backup, save_freq=5)
    history = m.fit(x, y, epochs=4, batch_size=BATCH, shuffle=False, verbose=0,
                    callbacks=[progress, SignalSelf(1, 3), cb])
    return {
        "epochs_in_history": len(history.history["loss"]),
        "batches_seen": progress.batches_seen,
        "checkpoints": checkpoints(backup),
        "backup_exists": os.path.isdir(backup),
        "handler_restored": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    }


def mode_external(backup, progress_path):
    x, y = data()
    m = model()
    progress = Progress(progress_path)
    user = UserHandler(backup, progress)
    signal.signal(signal.SIGTERM, user)
    delivered = []

    class RecordDelivery(keras.callbacks.Callback):
        # Wraps fastbackup's handler once installed: records the steps
        # completed when the signal reached Python.
        def on_train_begin(self, logs=None):
            inner = signal.getsignal(signal.SIGTERM)

            def wrapper(signum, frame):
                delivered.append(progress.steps)
                inner(signum, frame)

            signal.signal(signal.SIGTERM, wrapper)

    cb = fastbackup.BackupAndRestore(backup, save_freq=1000,
                                     handle_sigterm=True)
    os.write(1, b"READY\n")
    history = m.fit(x, y, epochs=400, batch_size=BATCH, shuffle=False,
                    verbose=0, callbacks=[progress, cb, RecordDelivery()])
    return {
        "epochs_in_history": len(history.history["loss"]),
        "steps": progress.steps,
        "delivered_at": delivered,
        "user_calls": user.calls,
        "checkpoints": checkpoints(backup),
        "backup_exists": os.path.isdir(backup),
        "handler_restored": signal.getsignal(signal.SIGTERM) is user,
    }


def mode_chain(backup, progress_path):
    from tests.conftest import InterruptAt

    x, y = data()
    result = {}
    progress = Progress(progress_path)
    user = UserHandler(backup, progress)
    signal.signal(signal.SIGTERM, user)

    # A: a fit that raises leaves no on_train_end; SIGTERM afterwards must
    # still reach the previous handler.
    m = model()
    cb = fastbackup.BackupAndRestore(backup, save_freq=2, handle_sigterm=True)
    try:
        m.fit(x, y, epochs=3, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[progress, cb, InterruptAt(1, 2)])
    except RuntimeError:
        pass
    cb.wait_until_finished()  # no write in flight while the handler reads
    os.kill(os.getpid(), signal.SIGTERM)
    result["after_raise"] = {"user_calls": len(user.calls)}

    # B: the same callback resumes (Keras's documented pattern); SIGTERM
    # mid-training saves, stops, and calls the previous handler once.
    history = m.fit(x, y, epochs=3, batch_size=BATCH, shuffle=False,
                    verbose=0, callbacks=[progress, SignalSelf(2, 4), cb])
    result["resumed"] = {
        "user_calls": len(user.calls),
        "last_call": user.calls[-1] if user.calls else None,
        "epochs_in_history": len(history.history.get("loss", [])),
        "checkpoints": checkpoints(backup),
        "handler_restored": signal.getsignal(signal.SIGTERM) is user,
    }

    # C: SIGTERM after the last step boundary (at the last epoch's end).
    backup2 = backup + "-c"
    user.backup = backup2
    m2 = model()
    cb2 = fastbackup.BackupAndRestore(backup2, save_freq=3,
                                      handle_sigterm=True)
    m2.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0,
           callbacks=[progress, SignalSelf(1, at="epoch_end"), cb2])
    result["after_last_step"] = {
        "user_calls": len(user.calls),
        "last_call": user.calls[-1] if len(user.calls) >= 3 else None,
        "backup_exists": os.path.isdir(backup2),
        "checkpoints": checkpoints(backup2) if os.path.isdir(backup2) else None,
        "handler_restored": signal.getsignal(signal.SIGTERM) is user,
    }
    return result


class SignalingData(keras.utils.PyDataset):
    """The training data; fetching batch `at[1]` of epoch `at[0]` (as
    `progress` counts epochs) sends SIGTERM to this process."""

    def __init__(self, progress, at):
        super().__init__()
        self.x, self.y = data()
        self.progress = progress
        self.at = at

    def __len__(self):
        return STEPS_PER_EPOCH

    def __getitem__(self, index):
        if (self.progress.epoch, index) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        rows = slice(index * BATCH, (index + 1) * BATCH)
        return self.x[rows], self.y[rows]


def mode_in_step(backup, progress_path):
    from tests.conftest import all_state

    m = model()
    progress = Progress(progress_path)
    dataset = SignalingData(progress, at=(1, 3))
    delivered = []

    class RecordDelivery(keras.callbacks.Callback):
        # Records where the signal reached Python: the steps completed and
        # whether it was inside the batch fetch (that is, mid-step).
        def on_train_begin(self, logs=None):
            inner = signal.getsignal(signal.SIGTERM)

            def wrapper(signum, frame):
                names, f = [], frame
                while f is not None:
                    names.append(f.f_code.co_name)
                    f = f.f_back
                delivered.append({"steps": progress.steps,
                                  "in_fetch": "__getitem__" in names})
                inner(signum, frame)

            signal.signal(signal.SIGTERM, wrapper)

    cb = fastbackup.BackupAndRestore(backup, save_freq=1000,
                                     handle_sigterm=True)
    m.fit(dataset, epochs=4, verbose=0, shuffle=False,
          callbacks=[progress, cb, RecordDelivery()])
    # Training stopped at the step boundary where the state was saved, so
    # the checkpoint must hold exactly the model's state now.
    final = all_state(m)
    [(step, path)] = LocalStore(backup).list_checkpoints()
    with CheckpointReader(path) as reader:
        reader.verify()
        saved = [np.array(reader.verified_view(e)) for e in reader.entries]
        position = [reader.epoch, reader.batch,
                    reader.meta.get("extra", {}).get("position")]
    return {
        "delivered": delivered,
        "steps": progress.steps,
        "position": position,
        "state_matches": len(saved) == len(final) and all(
            a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(a, b, equal_nan=True)
            for a, b in zip(saved, final)
        ),
    }


def main():
    mode, backup, progress_path = sys.argv[1:4]
    result = {"self": mode_self, "external": mode_external,
              "chain": mode_chain, "in_step": mode_in_step}[mode](
                  backup, progress_path)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
