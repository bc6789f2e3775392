"""Subprocess side of tests/test_sharding.py: one process of a 2-process JAX job.

    python tests/multiprocess_worker.py WORKDIR PROCESS_ID COORDINATOR_PORT

Two processes x 2 CPU devices on 127.0.0.1, joined by
`jax.distributed.initialize`, train a model sharded on a (1, 4) mesh whose
model axis crosses the processes. Prints one JSON line prefixed "RESULT "
saying how `fit` with fastbackup ended in this process.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402


def main(workdir: str, process_id: int, port: int) -> dict:
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
        initialization_timeout=60,
    )
    import keras
    import numpy as np
    from keras import distribution

    import fastbackup

    mesh = distribution.DeviceMesh((1, 4), ["batch", "model"], jax.devices())
    layout = distribution.LayoutMap(mesh)
    layout[".*dense.*kernel"] = (None, "model")
    dist = distribution.ModelParallel(layout_map=layout,
                                      batch_dim_name="batch")
    dist.auto_shard_dataset = False
    distribution.set_distribution(dist)
    keras.utils.set_random_seed(0)  # the same initial values everywhere
    model = keras.Sequential([keras.layers.Input((8,)),
                              keras.layers.Dense(8), keras.layers.Dense(4)])
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((16, 8), "float32")
    y = np.ones((16, 4), "float32")
    try:
        model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[
            fastbackup.BackupAndRestore(os.path.join(workdir, "backup"),
                                        save_freq=1)])
    except NotImplementedError as e:
        return {"fit": "refused", "error": str(e),
                "processes": jax.process_count()}
    return {"fit": "ok", "processes": jax.process_count()}


if __name__ == "__main__":
    result = main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    print("RESULT " + json.dumps(result), flush=True)
    # Skip jax.distributed's shutdown barrier: the test only needs the line.
    os._exit(0)
