"""Overlapped snapshots: copy the weights behind the next training step.

The technique of CheckFreq (FAST '21) and of torch DCP's staging. At a due
save the training thread copies only the variables that the next step
changes before its optimizer update: non-trainable variables (BatchNorm
statistics, seed-generator states), metric variables. The trainable model
variables and the optimizer's variables change only inside
`optimizer.apply`, so a background thread copies them while the next step's
forward and backward passes run, and an `UpdateGate` in front of
`optimizer.apply` holds that step's update until the copy is done. The
checkpoint is then bit for bit the state at the recorded step.

How the gate holds the update depends on the backend:

- torch: the train step is eager Python; `apply` is wrapped on the
  optimizer instance and waits on an event.
- TensorFlow: the train step is a `tf.function` traced once; the wrapped
  `apply` puts a stateful `tf.numpy_function` in the graph and creates every
  op of the update under a control dependency on it. When no copy is
  pending the function returns at once. The train function is re-made so
  that the trace sees the wrapper, and the original is put back at the end.
- JAX: not supported. The trainer donates the whole state to every step,
  so a background thread could only read the arrays through views that
  keep the buffers from being donated; the step then allocates and faults
  in a fresh copy of the state (section j of `docs/benchmarks.md`: five
  times the cost of the synchronous copy). JAX saves synchronously.

Where the overlap cannot be proven correct it is not used, and the save
falls back to the synchronous copy (`unsupported_reason`): JAX, variables
off the host (a GPU's copy to the host is a different engine and is not
built here), XLA-compiled or `torch.compile`d train steps (a host callback
cannot be ordered inside them here), and `tf.distribute` strategies.

The copy thread depends on nothing the training thread holds, so a wait for
it always ends: the gate, the end of `fit`, a SIGTERM save and an epoch-end
save all wait for the copy (never the other way round), and a `fit` that
raises leaves the copy to finish and hand its snapshot to the writer.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import keras

from fastbackup import backend

log = logging.getLogger("fastbackup")

# Instance attribute set on a gated optimizer's `apply`, pointing back to
# the gate, so that a gate left behind by a `fit` that raised is found.
_GATE_ATTR = "_fastbackup_update_gate"


def unsupported_reason(model: keras.Model) -> str | None:
    """Why the update of `model` cannot be gated, or `None` if it can.

    Args:
        model: a compiled model.

    Returns:
        A sentence naming the obstacle, or `None`.
    """
    framework = backend.current()
    obstacle = framework.overlap_obstacle(model)
    if obstacle is not None:
        return obstacle
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return "the model has no optimizer"
    if getattr(model, "jit_compile", False):
        return (
            "the train step is compiled (jit_compile=True) and cannot wait "
            "for a host thread"
        )
    # Only TensorFlow's models have a distribute strategy.
    if getattr(model, "_distribute_strategy", None):
        return "the model trains under a tf.distribute strategy"
    for variable in list(model.variables) + list(optimizer.variables):
        if not framework.on_host(variable):
            return (
                f"variable {variable.path} lives on "
                f"{getattr(variable.value, 'device', '?')}, not on the host"
            )
    return None


def gate_for(model: keras.Model, previous: UpdateGate | None) -> UpdateGate | None:
    """The gate of `model`'s update for a `fit` with overlapped saves.

    Args:
        model: the model about to be trained.
        previous: the gate of the callback's previous `fit`, reused (with
            its gated train function: no retrace) if it gates the same
            model and optimizer.

    Returns:
        The gate, installed; `None` where the update cannot be gated (the
        reason is logged), and saves copy synchronously.
    """
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("fastbackup: FASTBACKUP_OVERLAP=on, but saves copy "
                 "synchronously: %s", reason)
        return None
    gate = previous
    if gate is None or gate.model is not model or (
        gate.optimizer is not model.optimizer
    ):
        gate = UpdateGate(model)
    gate.install()
    return gate


def updated_by_apply(model: keras.Model) -> Callable[[Any], bool]:
    """Picks the variables that change only inside `optimizer.apply`: those
    an overlapped save copies behind the next step."""
    ids = {id(v) for v in model.trainable_variables}
    ids.update(id(v) for v in model.optimizer.variables)
    return lambda variable: id(variable) in ids


class UpdateGate:
    """Holds the optimizer's update while a background copy runs.

    Args:
        model: the model whose `optimizer.apply` is gated.

    Attributes:
        held_seconds: how long each held update waited for the copy.
        copies: background copies started.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self.optimizer = model.optimizer
        self.held_seconds: list[float] = []
        self.copies = 0
        self._idle = threading.Event()
        self._idle.set()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._installed = False
        self._checked = 0
        self._had_apply: Any = None
        # TensorFlow: the model's train function before the gate, and the
        # gated one made from it, kept from one `fit` to the next so that
        # each `fit` does not trace the step again.
        self._train_function: Any = None
        self._gated_function: Any = None

    # Installation -------------------------------------------------------

    def recheck(self) -> str | None:
        """`unsupported_reason` again if variables were created since.

        A model built by its first step, and an optimizer built by its
        first update, create their variables after `fit` began; they may
        live on an accelerator.
        """
        count = len(self.model.variables) + len(self.optimizer.variables)
        if count == self._checked:
            return None
        reason = unsupported_reason(self.model)
        if reason is None:
            self._checked = count
        return reason

    def still_supported(self) -> bool:
        """False, with the gate uninstalled and the reason logged, once the
        variables created since the gate was installed rule it out (see
        `recheck`); a copy error then stays stored for `pop_error`."""
        reason = self.recheck()
        if reason is None:
            return True
        log.info("fastbackup: saves copy synchronously from now on: %s",
                 reason)
        self.uninstall()
        return False

    def install(self) -> None:
        """Wraps `optimizer.apply`; on TensorFlow, re-makes the train step."""
        if self._installed:
            return
        optimizer = self.optimizer
        stale = optimizer.__dict__.get("apply")
        if stale is not None and getattr(stale, _GATE_ATTR, None) is not None:
            # A `fit` that raised skipped `on_train_end`: take its gate off.
            getattr(stale, _GATE_ATTR).uninstall()
        self._had_apply = optimizer.__dict__.get("apply")
        gated = backend.current().gated_apply(optimizer.apply, self._hold)
        setattr(gated, _GATE_ATTR, self)
        optimizer.apply = gated
        if backend.current().retraces_for_gate:
            current = self.model.train_function
            if self._gated_function is not None and (
                current is self._train_function
            ):
                self.model.train_function = self._gated_function
            else:
                # A train function traced before has no gate in its graph.
                self._train_function = current
                self.model.make_train_function(force=True)
                self._gated_function = self.model.train_function
        self._installed = True

    def uninstall(self) -> None:
        """Waits for a pending copy, then leaves model and optimizer as found.

        A copy error stays stored for `pop_error`.
        """
        self.wait()
        if not self._installed:
            return
        optimizer = self.optimizer
        if self._had_apply is not None:
            optimizer.apply = self._had_apply
        else:
            del optimizer.apply
        if backend.current().retraces_for_gate:
            self.model.train_function = self._train_function
        self._had_apply = None
        self._installed = False

    # The copy -------------------------------------------------------------

    def start(
        self,
        copy: Callable[[], None],
        on_done: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """Runs `copy` on a background thread; the next update waits for it.

        Args:
            copy: copies the deferred variables; must touch nothing else.
            on_done: called on the copy thread once `copy` returned.
            on_error: called on the copy thread with the exception if
                `copy` or `on_done` raised; the exception is also kept for
                `pop_error`.
        """
        self.wait()
        self._idle.clear()
        self.copies += 1

        def run() -> None:
            try:
                copy()
                on_done()
            except BaseException as e:  # kept for the training thread
                log.debug("overlapped snapshot copy failed: %r", e)
                self._error = e
                on_error(e)
            finally:
                self._idle.set()

        self._thread = threading.Thread(
            target=run, name="fastbackup-snapshot", daemon=True
        )
        _track(self)
        self._thread.start()

    def pending(self) -> bool:
        """True while a copy runs."""
        return not self._idle.is_set()

    def wait(self) -> None:
        """Blocks until no copy is pending."""
        self._idle.wait()

    def pop_error(self) -> BaseException | None:
        """Returns and clears the last copy's exception, if any."""
        error, self._error = self._error, None
        return error

    def _hold(self) -> None:
        # The fast path: one flag test per step when no copy is pending.
        if self._idle.is_set():
            return
        start = time.perf_counter()
        self._idle.wait()
        self.held_seconds.append(time.perf_counter() - start)


_live_gates: weakref.WeakSet[UpdateGate] = weakref.WeakSet()
_exit_hook_registered = False


def _track(gate: UpdateGate) -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        # Registered after the writer's exit hook (writer.py registers it at
        # import), so it runs first: a copy still in flight at exit (after a
        # `fit` that raised) reaches the writer before the writer flushes.
        atexit.register(_finish_copies_at_exit)
        _exit_hook_registered = True
    _live_gates.add(gate)


def _finish_copies_at_exit() -> None:
    for gate in list(_live_gates):
        gate.wait()
