"""The coordination service wrapper and the parts store, in 2 real processes.

`tests/coordination_worker.py` joins two processes with
`jax.distributed.initialize` on 127.0.0.1 and drives `Coordinator` and
`ProcessParts` directly; the training paths are in test_sharding.py.
"""

from __future__ import annotations

import errno
import os

import keras
import pytest

from tests.conftest import free_port, run_workers

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "coordination_worker.py")

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="multi-process jobs (jax.distributed) exist on the JAX backend only",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("coordination")
    port = str(free_port())
    return run_workers([[WORKER, str(workdir), str(i), port] for i in range(2)],
                       timeout=180)


def test_processes_share_keys_under_one_namespace(results):
    first, second = results
    assert first["namespace"] == second["namespace"]
    assert first["namespace"].startswith("fastbackup/")
    assert first["gathered"] == second["gathered"] == [{"from": 0}, {"from": 1}]
    # Whoever set it first, both read the same value.
    assert first["first_wins"] == second["first_wins"] in (10, 11)
    assert first["peek_missing"] is None


def test_a_wait_nobody_answers_fails_at_its_deadline(results):
    for result in results:
        timeout = result["timeout"]
        assert timeout["errno"] == errno.ETIMEDOUT
        assert "timed out after 1.5 s waiting for a key nobody sets" in timeout["message"]
        assert "FASTBACKUP_PEER_TIMEOUT_SECONDS" in timeout["message"]
        # Bounded: the deadline plus at most a polling slice or two.
        assert 1.5 <= timeout["seconds"] < 10


def test_a_cancelled_wait_stops(results):
    for result in results:
        assert result["cancelled_after"] < 5


def test_a_checkpoint_missing_a_part_is_never_committed(results):
    lonely = results[0]["lonely_commit"]
    assert "timed out after 2 s waiting for the parts of step 0 of " \
           "process(es) [1]" in lonely["message"]
    assert lonely["seconds"] < 15
    assert results[0]["committed"] == []
    # This process's own part stays, uncommitted, for the next fit's clean-up.
    assert results[0]["parts_left"] == ["ckpt-000000000000.part-00000-of-00002.fbk"]
