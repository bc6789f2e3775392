"""When training stops for SIGTERM: the next step boundary, agreed by all.

A preemptible machine gets SIGTERM some seconds before it is taken away.
With `handle_sigterm`, the signal only raises a flag; at the next step
boundary the callback saves, waits until the checkpoint is durable and
stops training, then hands the signal to the handler that was there before.

In a multi-process job the signal may reach one process only, and every
process must save the same step: the first process to see it proposes the
next boundary through JAX's coordination service, and every process stops
there (the policy of Orbax's `PreemptionCheckpointingPolicy`, whose
processes agree through `multihost.reached_preemption`). A signal after the
last step boundary is agreed on at the end of `fit`: every process then
saves that same final state, or none does.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from fastbackup.coordination import Coordinator

log = logging.getLogger("fastbackup")


class SigtermPolicy:
    """One callback's handling of SIGTERM, one `fit` at a time.

    Args:
        enabled: handle SIGTERM at all (`handle_sigterm`).

    Attributes:
        preempted: this fit stopped (or ends) for SIGTERM; its backup must
            be kept for the resume.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.preempted = False
        self._pending = False
        self._coordinator: Coordinator | None = None
        # Step boundaries seen in this fit: the clock on which the processes
        # of a multi-process job agree to stop.
        self._boundaries = 0
        self._previous: Any = None
        self._late_previous: Any = None

    def begin_fit(self, model: Any, coordinator: Coordinator | None) -> None:
        """Resets for a new `fit` and installs the handler if enabled."""
        self._pending = False
        self.preempted = False
        self._boundaries = 0
        self._late_previous = None
        self._coordinator = coordinator
        if self.enabled:
            self._install(model)

    def reached_preemption(self) -> bool:
        """Counts a step boundary; true where training stops for SIGTERM.

        In one process: the first boundary after the signal. In a
        multi-process job: the boundary proposed by the first process that
        saw it. Each boundary comes after a step whose logs Keras has
        fetched, so after a step all the processes took part in: a process
        reaching the proposed boundary has passed the proposer's, where the
        proposal was published.
        """
        self._boundaries += 1
        coordinator = self._coordinator
        if coordinator is None or not self.enabled:
            due = self._pending
        else:
            if self._pending:
                coordinator.first_wins("sigterm", self._boundaries + 1)
                self._pending = False
            stop = coordinator.peek("sigterm")
            due = stop is not None and self._boundaries >= stop
            if due and self._boundaries > stop:
                log.warning("fastbackup: SIGTERM stop agreed for batch %d of "
                            "this fit was reached late, at %d", stop,
                            self._boundaries)
        if due:
            self._pending = False
            self.preempted = True
        return due

    def stopped(self) -> None:
        """Training stopped with its state durable: the signal goes on to
        the handler that was there before."""
        previous = self._previous
        self._uninstall()
        if callable(previous):
            previous(signal.SIGTERM, None)

    def late_signal(self) -> bool:
        """At the end of `fit`: true if SIGTERM came after the last step
        boundary (in any process), so that the final state is saved and
        kept. Takes the handler off; `chain_late_signal` passes it on."""
        previous = self._previous
        self._uninstall()
        late = self._pending
        coordinator = self._coordinator
        if self.enabled and coordinator is not None:
            # A process told to stop after the last step boundary (or that
            # proposed a boundary that never came): every process of the
            # job saves that same final state, or none does.
            late = any(coordinator.agree(
                "sigterm-at-end",
                late or (not self.preempted
                         and coordinator.peek("sigterm") is not None),
                "the processes' SIGTERM at the end of fit",
            ))
        if late:
            self._pending = False
            self.preempted = True
            self._late_previous = previous
        return late

    def chain_late_signal(self) -> None:
        """Hands a late SIGTERM to the previous handler, once the final
        state is durable and the backup released."""
        previous, self._late_previous = self._late_previous, None
        if callable(previous):
            previous(signal.SIGTERM, None)

    def _install(self, model: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("handle_sigterm needs fit() on the main thread; "
                        "SIGTERM is not handled")
            return
        previous = signal.getsignal(signal.SIGTERM)
        # A handler left by a fit that raised (Keras then skips
        # on_train_end) is replaced, not chained: chain what it chained.
        previous = getattr(previous, "_fastbackup_previous", previous)
        # `model` is taken by the caller, not in the handler: on JAX,
        # `Callback.model` writes the trainer's state back into the
        # variables, and a signal can arrive inside a step, after the state
        # it donates was read. Syncing then would leave the variables
        # holding arrays the step deletes.

        def handler(signum: int, frame: Any) -> None:
            if frame is None or _in_fit(frame, model):
                # Only a flag: the save must happen between two steps.
                self._pending = True
                return
            # The fit that installed this handler raised: no step boundary
            # will come. Hand the signal to the previous handler.
            self._previous = None
            if previous is None:
                return
            signal.signal(signal.SIGTERM, previous)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signum)

        handler._fastbackup_previous = previous  # type: ignore[attr-defined]
        self._previous = previous
        signal.signal(signal.SIGTERM, handler)

    def _uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _in_fit(frame: Any, model: Any) -> bool:
    """True if `frame` is inside `model.fit`."""
    while frame is not None:
        if (
            frame.f_code.co_name == "fit"
            and frame.f_locals.get("self") is model
        ):
            return True
        frame = frame.f_back
    return False
