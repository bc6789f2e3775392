"""Agreement between the processes of one job: JAX's coordination service.

A multi-process JAX job (`jax.distributed.initialize`) already runs a
coordination service with a key-value store and barriers; the processes'
backups agree through it, never through a protocol of our own. Every wait
here has a deadline and polls in short slices, so that a cancelled write
stops within a second and a dead process becomes an error, not a hang.

Keys live under `fastbackup/<backup id>/<fit>/`: the backup id is a hash of
the backup location, and the fit is a counter that every process advances
in the same order (they run the same program), so keys of two fits or two
backups never meet.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fastbackup import backend
from fastbackup.errors import PeerError

log = logging.getLogger("fastbackup")

# Each wait polls the service in slices this long, checking for
# cancellation and for the deadline in between.
_SLICE_SECONDS = 0.5

_fits: dict[str, itertools.count[int]] = {}
_fits_lock = threading.Lock()


class Coordinator:
    """One job's view of the coordination service, for one backup.

    Its keys are those of the current fit (see the module docstring): it is
    created at the start of a fit, and `next_fit` starts each later one.

    Args:
        client: JAX's `DistributedRuntimeClient`.
        index: this process's index.
        count: number of processes.
        location: the backup location (names the keys, and the errors).
        timeout: seconds any wait for another process may take.
    """

    def __init__(
        self, client: Any, index: int, count: int, location: str,
        timeout: float,
    ) -> None:
        self.client = client
        self.index = index
        self.count = count
        self.location = location
        self.timeout = timeout
        self._backup = hashlib.sha256(location.encode()).hexdigest()[:16]
        self.namespace = ""
        self.next_fit()

    def next_fit(self) -> None:
        """Moves to the keys of the next fit.

        Every process calls it at the same point of the same program, so
        they all draw the same fit number.
        """
        with _fits_lock:
            fit = next(_fits.setdefault(self._backup, itertools.count()))
        self.namespace = f"fastbackup/{self._backup}/{fit}"

    @property
    def is_primary(self) -> bool:
        """True in process 0, which locks, cleans up and commits."""
        return self.index == 0

    def _key(self, key: str) -> str:
        return f"{self.namespace}/{key}"

    def publish(self, key: str, value: Any) -> None:
        """Sets `key` to `value` (JSON) for every process to read."""
        self.client.key_value_set(self._key(key), json.dumps(value))

    def peek(self, key: str) -> Any:
        """The value of `key`, or `None` while it is not set."""
        try:
            raw = self.client.key_value_try_get(self._key(key))
        except Exception as e:  # JaxRuntimeError
            if "NOT_FOUND" in str(e):
                return None
            raise self._error(f"reading {key}: {e}") from None
        return json.loads(raw)

    def first_wins(self, key: str, value: Any) -> Any:
        """Sets `key` unless set already; returns the value that won."""
        try:
            self.client.key_value_set(self._key(key), json.dumps(value))
            return value
        except Exception as e:  # JaxRuntimeError
            if "ALREADY_EXISTS" not in str(e):
                raise self._error(f"setting {key}: {e}") from None
        return self.peek(key)

    def forget(self, key: str) -> None:
        """Deletes `key` and every key under `key/`."""
        self.client.key_value_delete(self._key(key))

    def wait(
        self, key: str, what: str, cancel: threading.Event | None = None,
        cancelled: type[BaseException] | None = None,
    ) -> Any:
        """Waits for another process to publish `key`.

        Args:
            key: the key.
            what: what is waited for, for the error ("process 0's commit").
            cancel: when set, stop waiting and raise `cancelled`.
            cancelled: the exception raised on cancellation.

        Raises:
            PeerError: not published in time, or a process died.
        """
        deadline = time.monotonic() + self.timeout
        return self._wait_until(key, deadline, what, cancel, cancelled)

    def _wait_until(
        self, key: str, deadline: float, what: str,
        cancel: threading.Event | None, cancelled: type[BaseException] | None,
    ) -> Any:
        full = self._key(key)
        while True:
            # A blocking read returns as soon as the key is set: no sleep
            # between polls adds to a checkpoint's time to durable.
            try:
                raw = self.client.blocking_key_value_get(
                    full, int(_SLICE_SECONDS * 1000)
                )
                return json.loads(raw)
            except Exception as e:  # JaxRuntimeError: only DEADLINE_EXCEEDED
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise self._error(f"waiting for {what}: {e}") from None
            self._check(deadline, what, cancel, cancelled)

    def gather(
        self, key: str, what: str, cancel: threading.Event | None = None,
        cancelled: type[BaseException] | None = None,
    ) -> list[Any]:
        """Waits until every process has published `key/<its index>`.

        Returns:
            The values, in process order.

        Raises:
            PeerError: a process did not publish in time, or died.
        """
        deadline = time.monotonic() + self.timeout
        return [
            self._wait_until(f"{key}/{i}", deadline,
                             f"{what} of process(es) [{i}]", cancel, cancelled)
            for i in range(self.count)
        ]

    def publish_mine(self, key: str, value: Any) -> None:
        """Publishes this process's `key/<index>` for `gather`."""
        self.publish(f"{key}/{self.index}", value)

    def agree(self, key: str, value: Any, what: str) -> list[Any]:
        """Publishes this process's value and returns everyone's."""
        self.publish_mine(key, value)
        return self.gather(key, what)

    def unanimous(self, key: str, what: str) -> Callable[[bool], bool]:
        """A series of yes/no rounds that every process takes part in.

        Args:
            key: names the rounds.
            what: what is voted on, for the error.

        Returns:
            A function that publishes this process's vote for the next round
            and returns whether every process voted yes.
        """
        rounds = itertools.count(1)

        def vote(yes: bool) -> bool:
            return all(self.agree(f"{key}/{next(rounds)}", yes, what))

        return vote

    def _check(
        self, deadline: float, what: str, cancel: threading.Event | None,
        cancelled: type[BaseException] | None,
    ) -> None:
        # No liveness probe here: the service's `get_live_nodes` is itself
        # a barrier of the processes it asks about. A dead process shows as
        # an error of the service (its heartbeats stop), or as the deadline.
        if cancel is not None and cancel.is_set():
            raise (cancelled or InterruptedError)(what)
        if time.monotonic() > deadline:
            raise self._error(
                f"timed out after {self.timeout:g} s waiting for {what} "
                "(FASTBACKUP_PEER_TIMEOUT_SECONDS)",
                errno.ETIMEDOUT,
            )

    def _error(self, message: str, code: int = errno.EIO) -> PeerError:
        return PeerError(
            code, f"process {self.index} of {self.count}: {message}",
            self.location,
        )


def coordinator(location: str, timeout: float) -> Coordinator | None:
    """A `Coordinator` in a multi-process job, else `None`."""
    job = backend.current().job()
    if job is None:
        return None
    client, index, count = job
    return Coordinator(client, index, count, location, timeout)
