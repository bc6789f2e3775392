"""The models and data the benchmarks train and save.

The full model is the one the targets are stated for: a `Sequential` of six
`Dense(4096, relu)` and a `Dense(1)` on 4096 inputs, trained with Adam at
batch 32, about 100.7 M parameters and 1.2 GB of state (weights and both Adam
moments). The quick model has the same structure with 1024 units (about
76 MB of state): the same code paths, in seconds instead of minutes. The
medium model, 2048 units (about 302 MB of state, steps of about 0.1 s
here), is the shape where a save's cost is largest against the step: the
state is large, the step short.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Size of a benchmark model and of its training runs.

    Attributes:
        name: "quick", "medium" or "full".
        units: width of every hidden `Dense` layer.
        input_dim: number of input features.
        hidden_layers: number of hidden `Dense(units, relu)` layers.
        batch_size: samples per training step.
        loop_steps: training steps of one timed training loop (section b),
            split over `loop_epochs` epochs.
        loop_epochs: epochs of one timed training loop.
        memory_fit_steps: training steps of a memory probe's `fit`.
    """

    name: str
    units: int
    input_dim: int
    hidden_layers: int = 6
    batch_size: int = 32
    loop_steps: int = 20
    loop_epochs: int = 2
    memory_fit_steps: int = 6

    @property
    def steps_per_epoch(self) -> int:
        return self.loop_steps // self.loop_epochs

    @property
    def parameters(self) -> int:
        """Trainable parameters (weights and biases)."""
        widths = [self.input_dim] + [self.units] * self.hidden_layers + [1]
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


QUICK = ModelSpec(name="quick", units=1024, input_dim=1024, loop_steps=12)
MEDIUM = ModelSpec(name="medium", units=2048, input_dim=2048, loop_steps=60)
FULL = ModelSpec(name="full", units=4096, input_dim=4096, loop_steps=20)
SPECS = {s.name: s for s in (QUICK, MEDIUM, FULL)}


def build_model(spec: ModelSpec, seed: int = 0) -> keras.Model:
    """Builds and compiles a fresh model (its optimizer is not built yet).

    Args:
        spec: the model's size.
        seed: seed of the initial weights.
    """
    keras.utils.set_random_seed(seed)
    layers: list[Any] = [keras.layers.Input((spec.input_dim,))]
    layers += [
        keras.layers.Dense(spec.units, activation="relu")
        for _ in range(spec.hidden_layers)
    ]
    layers.append(keras.layers.Dense(1))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    return model


def make_data(spec: ModelSpec, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random regression data of exactly `steps` full batches."""
    rng = np.random.default_rng(seed)
    n = steps * spec.batch_size
    x = rng.standard_normal((n, spec.input_dim), dtype=np.float32)
    y = (x[:, :8].sum(axis=1, keepdims=True) * 0.1).astype(np.float32)
    return x, y


def fit_inputs(spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Arguments of `fit` that feed `x, y` in batches, in order.

    On TensorFlow, a `tf.data.Dataset` with autotuning off. From numpy
    arrays `fit` builds an autotuned one, and then the first step of every
    epoch after the first waits for tf.data's autotuning thread to wake up
    and exit, which takes up to about 5 s depending on how long the epoch
    lasted. Measured on the full model: a callback that only sleeps 70 ms
    per step met that wait in 2 of 10 two-epoch runs (5.5 s each); with
    autotuning off, in none of 12. Left on, it lands on whichever
    configuration's epoch length falls in the wrong window.
    """
    if keras.backend.backend() != "tensorflow":
        return {"x": x, "y": y, "batch_size": spec.batch_size, "shuffle": False}
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(spec.batch_size)
    # shuffle=False only silences Keras's warning that a dataset ignores it.
    return {"x": dataset.with_options(options), "shuffle": False}


def warm_up(model: keras.Model, spec: ModelSpec) -> None:
    """Trains two steps: traces the train function and builds the optimizer.

    Afterwards every variable, Adam's moments included, holds dense values
    like those of a model in training (freshly built moments are zeros, which
    compress so well that they would flatter any compressing writer).
    """
    x, y = make_data(spec, steps=2, seed=1)
    model.fit(x, y, batch_size=spec.batch_size, epochs=1, shuffle=False, verbose=0)


def fresh_restore_target(spec: ModelSpec, seed: int = 1) -> keras.Model:
    """A new model of the same architecture, its optimizer built, untrained."""
    model = build_model(spec, seed=seed)
    model.optimizer.build(model.trainable_variables)
    return model


def state_arrays(model: keras.Model) -> list[np.ndarray]:
    """Zero-copy host views of every variable a checkpoint covers.

    The views alias TensorFlow's buffers: drop them before training again
    (TensorFlow copies a variable before updating it in place while another
    tensor still references its buffer).
    """
    from fastbackup import backend
    from fastbackup.snapshot import collect_variables

    # The same zero-copy reads the snapshot uses, per backend.
    read = backend.current().read_host
    return [read(v) for _, v in collect_variables(model)]


def state_nbytes(model: keras.Model) -> int:
    """Bytes of the state a checkpoint covers (model, optimizer, metrics)."""
    from fastbackup.snapshot import collect_variables

    total = 0
    for _, v in collect_variables(model):
        count = int(np.prod(v.shape, dtype=np.int64))
        total += count * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
    return total
