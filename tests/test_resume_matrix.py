"""The resume matrix: save points x model kinds x dtypes x optimizers.

Every row interrupts a `fit` with `resume_mid_epoch=True` at one save point,
resumes it in a fresh model, and compares the resumed run's history and
final state (weights, optimizer, seed generators) with an uninterrupted
run's, bit for bit.

The factors (issue 21):

- save point: the checkpoint after an epoch's first batch, after a batch in
  the middle of an epoch, after an epoch's last batch (resumed as that
  epoch's end), and at an epoch's end (`save_freq="epoch"`);
- validation: with and without `validation_data` (a last-batch checkpoint
  with validation is the job dying during validation);
- model kind: Sequential (with seeded Dropout), functional with two outputs
  (per-output losses and metrics), subclassed with its own `train_step`;
- dtype: float32, the `mixed_float16` policy (loss scaling), float64
  (`set_floatx`; on JAX without x64 the arrays are float32);
- optimizer with state: Adam with a learning-rate schedule, SGD with
  momentum, SGD with gradient accumulation.

The full product is 4 x 2 x 3 x 3 x 3 = 216 runs of three fits each: at the
6.6 s a row took here (2 loaded cores; 12 rows in 86 s on TensorFlow and
on JAX, 15 s on torch), about 24 minutes per backend. `ROWS` is a covering
subset: every pair of values
of any two factors occurs in at least one row (pairwise, or all-pairs,
testing; `test_rows_cover_every_pair` checks it). 12 rows is the least any
such subset can have (save point x model kind alone has 12 pairs). A fault
that depends on one factor or on the interaction of two is caught; one that
needs three particular values together may not be.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest

import fastbackup
from tests.conftest import InterruptAt, all_state, assert_state_equal

EPOCHS = 3
BATCH = 8
N = 24  # 3 batches per epoch
STEPS = N // BATCH

SAVE_POINTS = ("first_batch", "mid_epoch", "last_batch", "epoch_end")
VALIDATION = (False, True)
MODELS = ("sequential", "functional_two_outputs", "subclassed_train_step")
DTYPES = ("float32", "mixed_float16", "float64")
OPTIMIZERS = ("adam_schedule", "sgd_momentum", "gradient_accumulation")

# (save point, validation, model, dtype, optimizer): with i = 3 * s + m for
# save point s and model m, the dtype is (s + m) % 3 and the optimizer
# (s + 2 m) % 3 (two orthogonal Latin squares: every dtype x optimizer pair
# occurs), and validation alternates with i.
ROWS = [
    (
        SAVE_POINTS[s], VALIDATION[(3 * s + m) % 2], MODELS[m],
        DTYPES[(s + m) % 3], OPTIMIZERS[(s + 2 * m) % 3],
    )
    for s in range(len(SAVE_POINTS))
    for m in range(len(MODELS))
]

# Where each save point interrupts: (save_freq, epoch, batch) for
# `InterruptAt`, and the checkpoint's expected (epoch, batch) position.
INTERRUPTS = {
    "first_batch": (1, 1, 0),
    "mid_epoch": (1, 1, 1),
    "last_batch": (1, 1, STEPS - 1),
    "epoch_end": ("epoch", 2, None),
}


def test_rows_cover_every_pair():
    factors = (SAVE_POINTS, VALIDATION, MODELS, DTYPES, OPTIMIZERS)
    for a, b in itertools.combinations(range(len(factors)), 2):
        seen = {(row[a], row[b]) for row in ROWS}
        missing = set(itertools.product(factors[a], factors[b])) - seen
        assert not missing, (a, b, sorted(missing, key=str))


class SubclassedModel(keras.Model):
    """A subclassed model with its own `train_step`.

    The step is the backend's own (each backend's `train_step` has its own
    signature: JAX's is stateless), reached through the override, so that
    the callback meets a model whose step is not Keras's `Trainer` method.
    """

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.drop = keras.layers.Dropout(0.2, seed=5)
        self.out = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.out(self.drop(self.hidden(x), training=training))

    def train_step(self, *args, **kwargs):
        return super().train_step(*args, **kwargs)


def _optimizer(kind):
    if kind == "adam_schedule":
        return keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(
            0.02, decay_steps=2, decay_rate=0.8))
    if kind == "sgd_momentum":
        return keras.optimizers.SGD(0.02, momentum=0.9)
    return keras.optimizers.Adam(0.02, gradient_accumulation_steps=2)


def _model(kind, optimizer):
    if kind == "sequential":
        model = keras.Sequential([
            keras.layers.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dropout(0.2, seed=3),
            keras.layers.Dense(1),
        ])
        loss = "mse"
    elif kind == "functional_two_outputs":
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(8, activation="relu")(inputs)
        hidden = keras.layers.Dropout(0.2, seed=4)(hidden)
        model = keras.Model(inputs, {
            "a": keras.layers.Dense(1, name="a")(hidden),
            "b": keras.layers.Dense(2, name="b")(hidden),
        })
        loss = {"a": "mse", "b": "mae"}
    else:
        model = SubclassedModel()
        model(np.zeros((1, 4), "float32"))
        loss = "mse"
    metrics = (
        {"a": ["mae"], "b": ["mse"]} if kind == "functional_two_outputs"
        else ["mae"]
    )
    model.compile(optimizer=_optimizer(optimizer), loss=loss, metrics=metrics)
    return model


def _data(kind, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(keras.backend.floatx())
    y = (x[:, :1] * 2 - x[:, 1:2]).astype(x.dtype)
    if kind == "functional_two_outputs":
        return x, {"a": y, "b": np.concatenate([y, -y], axis=1)}
    return x, y


@pytest.fixture
def dtype_policy(request):
    """Sets the row's dtype for the test's duration only."""
    name = request.param
    if name == "mixed_float16":
        keras.mixed_precision.set_dtype_policy("mixed_float16")
    elif name == "float64":
        keras.backend.set_floatx("float64")
    try:
        yield name
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
        keras.backend.set_floatx("float32")


def _fit(model, kind, validation, callbacks):
    x, y = _data(kind, N, seed=1)
    return model.fit(
        x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0,
        validation_data=_data(kind, 8, seed=2) if validation else None,
        callbacks=callbacks,
    )


@pytest.mark.parametrize(
    "save_point, validation, kind, dtype_policy, optimizer",
    ROWS,
    indirect=["dtype_policy"],
    ids=["-".join(str(v) for v in row) for row in ROWS],
)
def test_resume_matches_uninterrupted_run(
    tmp_path, monkeypatch, save_point, validation, kind, dtype_policy, optimizer
):
    # Every save is made before the next step, so that the checkpoint is
    # exactly the save point's.
    monkeypatch.setenv("FASTBACKUP_ON_BUSY", "wait")
    monkeypatch.setenv("FASTBACKUP_FSYNC", "off")
    keras.utils.set_random_seed(11)
    reference = _model(kind, optimizer)
    history = _fit(reference, kind, validation, []).history
    expected_state = all_state(reference, metrics=False)

    save_freq, epoch, batch = INTERRUPTS[save_point]
    keras.utils.set_random_seed(11)
    model = _model(kind, optimizer)
    with pytest.raises(RuntimeError, match="Interrupting"):
        _fit(model, kind, validation, [
            fastbackup.BackupAndRestore(
                tmp_path, save_freq=save_freq, resume_mid_epoch=True),
            InterruptAt(epoch, batch),
        ])

    keras.utils.set_random_seed(999)  # the resumed run must not depend on it
    fresh = _model(kind, optimizer)
    callback = fastbackup.BackupAndRestore(
        tmp_path, save_freq=save_freq, resume_mid_epoch=True)
    resumed = _fit(fresh, kind, validation, [callback]).history

    _, saved_epoch, saved_batch = callback.restored_from
    if batch is None:
        assert (saved_epoch, saved_batch) == (epoch, 0)
        first = epoch
    else:
        assert (saved_epoch, saved_batch) == (epoch, batch)
        # A checkpoint after an epoch's last batch resumes at the next one.
        first = epoch + 1 if batch == STEPS - 1 else epoch
    assert sorted(resumed) == sorted(history)
    for key, values in history.items():
        assert resumed[key] == values[first:], key
    assert_state_equal(all_state(fresh, metrics=False), expected_state)
