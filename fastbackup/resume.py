"""Mid-epoch resume: continue at the batch after the checkpoint.

Keras's loop cannot start in the middle of an epoch, so a resumed `fit`
(with `resume_mid_epoch`) replays the interrupted epoch's first batches
without training them:

- the train function is wrapped, so that for those batches it consumes the
  input without training: the data position, the optimizer's iteration
  count, the learning-rate schedule and every seed generator continue
  exactly where the checkpoint was;
- the other callbacks are spared those batches' hooks (`_HiddenBatches`),
  so that progress bars and step counters see the batches under the
  indices they had in the interrupted run;
- the epoch's running metrics continue from their saved values instead of
  the zeros Keras resets them to at the epoch's start (compiled metrics
  that TensorFlow has not built at the restore are built from the first
  skipped batch, then given their saved values);
- a checkpoint after an epoch's last batch resumes at the next epoch
  (`continues_at`).
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import keras
import numpy as np

from fastbackup import backend
from fastbackup.snapshot import collect_variables

log = logging.getLogger("fastbackup")


def continues_at(
    epoch: int, batch: int, mid_epoch: bool, steps: int | None
) -> tuple[int, bool]:
    """Where a `resume_mid_epoch` fit continues from a checkpoint.

    A checkpoint after an epoch's last batch (`save_freq` divides the
    epoch, or SIGTERM came at its end) holds the state of that epoch's end:
    the job died during validation or before the next epoch's first save.
    It resumes as an epoch-end checkpoint, at the next epoch; skipping
    every batch of its epoch instead would leave that epoch without a
    trained batch, so without `loss` in its logs.

    Args:
        epoch: the checkpoint's epoch.
        batch: the checkpoint's last trained batch in that epoch.
        mid_epoch: the checkpoint was taken after a batch (`batch_end`).
        steps: the batches in an epoch (`params["steps"]`), `None` when the
            input's length is unknown.

    Returns:
        `(epoch, mid_epoch)`: the epoch the fit starts at, and whether it
        starts inside it, after `batch`.
    """
    if mid_epoch and steps is not None and batch + 1 >= steps:
        return epoch + 1, False
    return epoch, mid_epoch


class MidEpochResume:
    """The skip of one resumed epoch, from `start` to that epoch's end."""

    def __init__(self) -> None:
        # Batches of the resumed epoch still to skip, and the epoch.
        self._skip_batches = 0
        self._epoch: int | None = None
        # Batches of the resumed epoch up to this index are hidden from every
        # callback; -1 when none is.
        self._hidden_through = -1
        self._hiding: _HiddenBatches | None = None
        self._saved_metrics: list[tuple[Any, Any]] = []
        # Saved values of compiled metrics the model had not built at the
        # restore, by name: assigned once the first skipped batch built them.
        self._unbuilt_metrics: dict[str, np.ndarray] = {}

    def reset(self) -> None:
        """Forgets any skip (a new `fit`; one that raised left its hooks)."""
        self._skip_batches = 0
        self._epoch = None
        self._saved_metrics = []
        self._unbuilt_metrics = {}
        self.end_epoch()

    def start(
        self, callback: Any, model: Any, epoch: int, batch: int,
        unbuilt_metrics: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Makes the coming `fit` skip the batches trained before `batch`.

        Args:
            callback: the callback that restored (its `CallbackList` is the
                one whose batch hooks are hidden).
            model: the model being trained.
            epoch: the checkpoint's epoch.
            batch: the checkpoint's last trained batch in that epoch.
            unbuilt_metrics: the saved values of compiled-metric variables
                the model has not built yet (TensorFlow builds them when its
                first step is traced), by name; they are built from the
                first skipped batch and given these values.
        """
        self._skip_batches = batch + 1
        self._epoch = epoch
        self._hide_batches_through(callback, batch)
        self._saved_metrics = [
            (v, np.array(v.numpy(), copy=True))
            for name, v in collect_variables(model)
            if name.startswith("metrics.")
        ]
        self._unbuilt_metrics = dict(unbuilt_metrics or {})
        real = model.train_function
        framework = backend.current()
        steps = int(getattr(model, "steps_per_execution", 1) or 1)

        def build_metrics(data: Any) -> None:
            if self._unbuilt_metrics:
                self._build_metrics(model, data)

        def skipping_train_function(*args: Any) -> Any:
            if self._skip_batches <= 0:
                model.train_function = real
                return real(*args)
            self._skip_batches -= steps
            return framework.skip_step(args, steps, build_metrics)

        model.train_function = skipping_train_function
        log.info("resuming mid-epoch: epoch %d continues after batch %d",
                 epoch, batch)

    def hidden(self, batch: int) -> bool:
        """True for a batch trained before the checkpoint, skipped now."""
        return batch <= self._hidden_through

    def begin_epoch(self, epoch: int) -> None:
        """At the resumed epoch's start (Keras has just reset the metrics),
        puts back the running values they had at the checkpoint."""
        if epoch == self._epoch:
            for variable, value in self._saved_metrics:
                variable.assign(value)
        self._saved_metrics = []

    def _build_metrics(self, model: Any, data: Any) -> None:
        """Builds the compiled metrics from a batch, then gives them their
        saved values.

        On TensorFlow they would be built by the first trained step's trace,
        which also updates them: their saved totals must be in place before
        that step. Keras builds them the same way itself, from a batch's
        shapes (`_symbolic_build`, what JAX's and torch's `fit` call before
        the first step); nothing is computed and no state changes.
        """
        values, self._unbuilt_metrics = self._unbuilt_metrics, {}
        compiled = getattr(model, "_compile_metrics", None)
        if compiled is not None and not compiled.built:
            model._symbolic_build(data_batch=data)
        variables = dict(collect_variables(model))
        for name, value in values.items():
            variable = variables.get(name)
            if variable is None or tuple(variable.shape) != value.shape:
                log.warning(
                    "resume_mid_epoch: saved metric variable %s has no "
                    "counterpart of shape %s once the metrics are built; the "
                    "epoch's metrics restart from zero", name, value.shape)
                return
        for name, value in values.items():
            variables[name].assign(value)

    def end_epoch(self) -> None:
        """The resumed epoch is over: nothing is skipped or hidden any more."""
        self._skip_batches = 0
        self._hidden_through = -1
        if self._hiding is not None:
            self._hiding.remove()
            self._hiding = None

    def _hide_batches_through(self, callback: Any, batch: int) -> None:
        """Spares every callback the batch hooks of the skipped batches.

        Keras's fit loop calls its `CallbackList` for every batch of the
        epoch, so that list's two batch hooks are wrapped until the resumed
        epoch ends. A callback holds no reference to its list: it is found
        as the caller of `on_train_begin`.
        """
        self._hidden_through = batch
        callbacks = _calling_callback_list(callback)
        if callbacks is None:
            log.warning(
                "resume_mid_epoch: the CallbackList calling this callback was "
                "not found (fit called by a custom loop?); other callbacks "
                "see batches 0 to %d of the resumed epoch, which are skipped "
                "without training", batch)
            return
        self._hiding = _HiddenBatches(callbacks, self.hidden)


class _HiddenBatches:
    """Wraps a `CallbackList`'s batch hooks to drop some batches.

    Args:
        callbacks: the list `fit` calls.
        hidden: tells whether a batch index is hidden.
    """

    _HOOKS = ("on_train_batch_begin", "on_train_batch_end")

    def __init__(self, callbacks: Any, hidden: Any) -> None:
        self.callbacks = callbacks
        for name in self._HOOKS:
            real = getattr(callbacks, name)

            def hook(batch: int, logs: Any = None, _real: Any = real) -> Any:
                if hidden(batch):
                    return None
                return _real(batch, logs)

            # An instance attribute shadows the class's method for this list
            # only; removing it restores the method.
            setattr(callbacks, name, hook)

    def remove(self) -> None:
        for name in self._HOOKS:
            self.callbacks.__dict__.pop(name, None)


def _calling_callback_list(callback: Any) -> Any:
    """The `CallbackList` whose hook is calling `callback`, or `None`."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if (
            isinstance(owner, keras.callbacks.CallbackList)
            and any(c is callback for c in owner.callbacks)
        ):
            return owner
        frame = frame.f_back
    return None
