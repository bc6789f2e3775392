"""Tests of `fastbackup.backend`: what each Keras backend is asked for.

Run under every backend (`KERAS_BACKEND`), each case checks the backend
the suite runs on against the backend's own train function and variables,
not a stand-in.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from fastbackup import backend
from tests.conftest import make_data, make_model

BACKEND = keras.backend.backend()


def test_current_is_the_backend_keras_runs_on():
    framework = backend.current()
    assert framework.name == BACKEND
    assert backend.current() is framework  # chosen once


def test_read_host_gives_the_variable_value_with_its_dtype():
    model = make_model()
    model.build((None, 6))
    for variable in model.variables:
        host = backend.current().read_host(variable)
        assert isinstance(host, np.ndarray)
        assert host.dtype == np.dtype(keras.backend.standardize_dtype(variable.dtype))
        np.testing.assert_array_equal(host, keras.ops.convert_to_numpy(variable.value))


def test_read_host_of_bfloat16_keeps_the_bits():
    variable = keras.Variable(np.array([1.5, -2.25, 3.0]), dtype="bfloat16")
    host = backend.current().read_host(variable)
    assert host.dtype.name == "bfloat16"
    assert host.astype(np.float32).tolist() == [1.5, -2.25, 3.0]


def _trained_batches(model) -> int:
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


# The PyTorch trainer takes steps_per_execution=1 only.
@pytest.mark.parametrize(
    "steps_per_execution", [1] if BACKEND == "torch" else [1, 2]
)
def test_skip_step_consumes_batches_without_training(steps_per_execution):
    # The skip stands in for the real train function for a few calls: the
    # data position moves on (the epoch's remaining batches are the ones
    # trained), and nothing is trained while it skips.
    x, y = make_data(n=48)
    model = make_model()
    model.compile("sgd", "mse", steps_per_execution=steps_per_execution)
    model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)
    before = _trained_batches(model)
    framework = backend.current()
    skipped = []
    real = model.train_function

    class Skip(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            def skipping(*args):
                if len(skipped) < 2:
                    skipped.append(len(args))
                    return framework.skip_step(args, steps_per_execution)
                return real(*args)

            self.model.train_function = skipping

    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[Skip()])
    assert len(skipped) == 2
    # 6 batches in the epoch, 2 * steps_per_execution of them skipped.
    assert _trained_batches(model) - before == 6 - 2 * steps_per_execution


def test_skip_step_stops_at_the_end_of_the_data():
    framework = backend.current()
    iterator = iter([1, 2])
    args = (None, iterator) if BACKEND == "jax" else (iterator,)
    # Asked for more batches than remain: takes what there is, no error.
    framework.skip_step(args, 5)
    if BACKEND == "torch":
        # Its loop hands the train function a batch it already took.
        assert list(iterator) == [1, 2]
    else:
        assert list(iterator) == []


def test_overlap_obstacle_and_host_placement():
    model = make_model()
    model.build((None, 6))
    framework = backend.current()
    obstacle = framework.overlap_obstacle(model)
    if BACKEND in ("tensorflow", "torch"):
        # CPU variables, on a backend whose update can wait behind a copy.
        assert obstacle is None
        assert all(framework.on_host(v) for v in model.variables)
    else:
        assert "donates the training state" in obstacle


def test_single_process_holds_whole_variables():
    model = make_model()
    model.build((None, 6))
    framework = backend.current()
    assert framework.job() is None
    assert framework.process_part() is None
    assert all(framework.local_shards(v) is None for v in model.variables)


@pytest.mark.parametrize("index, region", [
    (None, ((0, 0), (4, 6))),
    ((slice(None),), ((0, 0), (4, 6))),
    ((slice(2, 4),), ((2, 0), (2, 6))),
    ((slice(None), slice(3, 6)), ((0, 3), (4, 3))),
    ((slice(0, 2), slice(None, 3)), ((0, 0), (2, 3))),
])
def test_region_of_a_sharding_index(index, region):
    # What `devices_indices_map` gives for one device: slices of the
    # leading dimensions, the rest whole.
    assert backend.region_of(index, (4, 6)) == region


def test_one_process_writes_whole_variables():
    # Sharded layouts across processes are tested by tests/test_sharding.py
    # (JAX processes with 1 and 2 devices each); in one process every
    # variable is written whole.
    model = make_model()
    model.build((None, 6))
    framework = backend.current()
    assert all(framework.written_regions(v) is None for v in model.variables)
