"""Subprocess side of tests/test_distribute.py: tf.distribute strategies.

    python tests/distribute_worker.py mirrored WORKDIR
    python tests/distribute_worker.py mwms WORKDIR INDEX PORT0,PORT1

TensorFlow's logical devices must be configured before TensorFlow
initialises, and a MultiWorkerMirroredStrategy cluster needs one process
per worker, so each case runs in its own interpreter. Prints one JSON line
prefixed "RESULT ".

- "mirrored": MirroredStrategy over 2 logical CPU devices. The same
  interrupted-then-resumed training runs with Keras's BackupAndRestore and
  with fastbackup's; reports epochs run after the resume and whether every
  variable of the two resumed models is bitwise equal.
- "mwms": one worker of a 2-worker MultiWorkerMirroredStrategy cluster on
  127.0.0.1; reports whether Keras's `fit` itself runs, and its error.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    return x, x.sum(axis=1, keepdims=True).astype("float32")


def mirrored(workdir: str) -> dict:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras
    import numpy as np

    import fastbackup
    from tests.conftest import InterruptAt

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = data()

    def model():
        with strategy.scope():
            m = keras.Sequential([
                keras.layers.Input((6,)),
                keras.layers.Dense(8, activation="relu"),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(1),
            ])
            m.compile(optimizer="adam", loss="mse", metrics=["mae"])
        return m

    def interrupted_then_resumed(make_callback, directory):
        keras.utils.set_random_seed(1)
        first = model()
        try:
            first.fit(x, y, epochs=4, batch_size=16, shuffle=False, verbose=0,
                      callbacks=[make_callback(directory), InterruptAt(2)])
        except RuntimeError:
            pass
        resumed = model()
        history = resumed.fit(x, y, epochs=4, batch_size=16, shuffle=False,
                              verbose=0, callbacks=[make_callback(directory)])
        return resumed, len(history.history["loss"])

    # Batch-level saves, so that the batch-end path runs under the strategy.
    theirs, keras_epochs = interrupted_then_resumed(
        lambda d: keras.callbacks.BackupAndRestore(d, save_freq=2),
        os.path.join(workdir, "keras"))
    ours, fastbackup_epochs = interrupted_then_resumed(
        lambda d: fastbackup.BackupAndRestore(d, save_freq=2),
        os.path.join(workdir, "fastbackup"))
    pairs = list(zip(theirs.weights, ours.weights))
    return {
        "replicas": strategy.num_replicas_in_sync,
        "variable_type": type(ours.weights[0].value).__name__,
        "keras_epochs_after_resume": keras_epochs,
        "fastbackup_epochs_after_resume": fastbackup_epochs,
        "variables": len(pairs),
        "bitwise_equal": all(
            np.array_equal(a.numpy(), b.numpy()) for a, b in pairs
        ),
    }


def mwms(index: int, ports: list[str]) -> dict:
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    })
    import keras
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        m = keras.Sequential([keras.layers.Input((6,)), keras.layers.Dense(1)])
        m.compile(optimizer="adam", loss="mse")
    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    try:
        m.fit(dataset, epochs=1, verbose=0)
    except Exception as e:  # reported to the test, which asserts on it
        return {"fit": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
    return {"fit": "ok"}


if __name__ == "__main__":
    mode, workdir = sys.argv[1], sys.argv[2]
    if mode == "mirrored":
        result = mirrored(workdir)
    else:
        result = mwms(int(sys.argv[3]), sys.argv[4].split(","))
    print("RESULT " + json.dumps(result), flush=True)
