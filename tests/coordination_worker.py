"""Subprocess side of tests/test_coordination.py: one of two JAX processes.

    python tests/coordination_worker.py WORKDIR PROCESS_ID PORT

Exercises `coordination.Coordinator` and `parts.ProcessParts` against the
real coordination service of a 2-process `jax.distributed` job (no model,
no devices needed). Prints one JSON line prefixed "RESULT ".
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402


def main(workdir: str, index: int, port: int) -> dict:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                               process_id=index, initialization_timeout=60)
    import numpy as np
    from jax._src import distributed

    from fastbackup import coordination
    from fastbackup import format as fmt
    from fastbackup.errors import PeerError
    from fastbackup.snapshot import HostSnapshot, TensorSpec
    from fastbackup.stores.base import WriteCancelled
    from fastbackup.stores.local import LocalStore
    from fastbackup.stores.parts import ProcessParts

    client = distributed.global_state.client
    result: dict = {}

    def fresh(timeout: float) -> coordination.Coordinator:
        return coordination.Coordinator(client, index, 2, workdir, timeout)

    c = fresh(60)
    result["namespace"] = c.namespace
    result["gathered"] = c.agree("hello", {"from": index}, "hello")
    result["first_wins"] = c.first_wins("stop", 10 + index)
    result["peek_missing"] = c.peek("nothing")
    c.agree("sync-1", True, "sync")

    # A wait nobody answers: a PeerError at the deadline, naming it.
    short = fresh(1.5)
    start = time.monotonic()
    try:
        short.wait("never", "a key nobody sets")
    except PeerError as e:
        result["timeout"] = {"errno": e.errno, "message": str(e),
                             "seconds": time.monotonic() - start}
    # A cancelled wait stops within one polling slice.
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    start = time.monotonic()
    try:
        short.wait("never", "a key nobody sets", cancel, WriteCancelled)
    except WriteCancelled:
        result["cancelled_after"] = time.monotonic() - start
    c.agree("sync-2", True, "sync")

    # A checkpoint whose other part never comes: process 0 gives up at the
    # deadline, commits nothing, and says which process is missing.
    store = LocalStore(os.path.join(workdir, "backup"))
    os.makedirs(store.directory, exist_ok=True)
    if index == 0:
        parts = ProcessParts(store, fresh(2.0))
        snap = HostSnapshot(
            specs=[TensorSpec("model.0:0", "w", np.dtype("float32"), (2,),
                              (4,), (0,))],
            arrays=[np.ones(2, "float32")], part=(0, 2))
        encoded = fmt.encode(snap, fmt.CompressionPolicy(None), 0)
        start = time.monotonic()
        try:
            parts.commit(0, encoded, sync=True)
        except PeerError as e:
            result["lonely_commit"] = {"message": str(e),
                                       "seconds": time.monotonic() - start}
        result["committed"] = [s for s, _ in store.list_checkpoints()]
        result["parts_left"] = store.list_parts()
    else:
        fresh(2.0)  # the same fit counter in both processes
    c.agree("sync-3", True, "sync")
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], int(sys.argv[2]),
                                      int(sys.argv[3]))), flush=True)
    # Process 0 hosts the coordination service: its shutdown waits for the
    # other process, which would abort if the service went first.
    jax.distributed.shutdown()
    os._exit(0)
