"""Subprocess side of tests/test_sharding.py: one JAX process, 4 CPU devices.

    python tests/sharding_worker.py WORKDIR

`JAX_NUM_CPU_DEVICES` must be set before JAX initialises, so this runs in
its own interpreter. A model sharded with `keras.distribution.ModelParallel`
on a (batch=1, model=4) mesh is interrupted mid-epoch and resumed
(`resume_mid_epoch=True`); the result is compared bitwise with an
uninterrupted run. The backup is then restored onto other layouts: a (2, 2)
mesh, `DataParallel` over the 4 devices, and a single device without any
distribution. Prints one JSON line prefixed "RESULT ".
"""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_NUM_CPU_DEVICES"] = "4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from keras import distribution  # noqa: E402

import fastbackup  # noqa: E402
from tests.conftest import (  # noqa: E402
    InterruptAt,
    all_state,
    dense_model as model,
    same_arrays as same,
)

EPOCHS = 3


def model_parallel(shape: tuple[int, int]) -> distribution.ModelParallel:
    mesh = distribution.DeviceMesh(shape, ["batch", "model"], jax.devices())
    layout = distribution.LayoutMap(mesh)
    layout[".*dense.*kernel"] = (None, "model")
    layout[".*dense.*bias"] = ("model",)
    return distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    return x, x[:, :4] * 2


def kernel_spec(m) -> str:
    sharding = m.layers[0].kernel.value.sharding
    return str(getattr(sharding, "spec", type(sharding).__name__))


def main(workdir: str) -> dict:
    backup = os.path.join(workdir, "backup")
    x, y = data()
    fit = dict(epochs=EPOCHS, batch_size=16, shuffle=False, verbose=0)
    distribution.set_distribution(model_parallel((1, 4)))
    reference = model()
    reference.fit(x, y, **fit)
    interrupted = model()
    try:
        interrupted.fit(x, y, **fit, callbacks=[
            fastbackup.BackupAndRestore(backup, save_freq=2),
            InterruptAt(1, 1)])
    except RuntimeError:
        pass
    resumed = model()
    cb = fastbackup.BackupAndRestore(backup, save_freq=2,
                                     resume_mid_epoch=True,
                                     delete_checkpoint=False)
    resumed.fit(x, y, **fit, callbacks=[cb])
    result = {
        "devices": len(jax.devices()),
        "sharded": not reference.layers[0].kernel.value.sharding.is_fully_replicated,
        "restored_from": list(cb.restored_from),
        "resume_equals_uninterrupted": same(
            all_state(resumed, metrics=False), all_state(reference, metrics=False)
        ),
        "layout_after_resume": kernel_spec(resumed),
    }
    saved = all_state(resumed)
    # The final checkpoint, restored onto other layouts. `fit` with
    # epochs=1, below the restored epoch, restores and trains nothing.
    layouts = {
        "model_parallel_2x2": model_parallel((2, 2)),
        "data_parallel_4": distribution.DataParallel(devices=jax.devices()),
        "single_device": None,
    }
    for name, layout in layouts.items():
        distribution.set_distribution(layout)
        target = model()
        target.build((None, 8))
        restore = fastbackup.BackupAndRestore(backup, save_freq=2,
                                              delete_checkpoint=False)
        target.fit(x, y, **{**fit, "epochs": 1}, callbacks=[restore])
        result[name] = {
            "equal": same(all_state(target), saved),
            "kernel_spec": kernel_spec(target),
            "kernel_devices": len(target.layers[0].kernel.value.devices()),
        }
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
