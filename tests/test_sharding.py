"""A model sharded over 4 devices of one JAX process: resume and reshard.

The training runs in its own interpreter (`tests/sharding_worker.py`):
`JAX_NUM_CPU_DEVICES` must be set before JAX initialises.
"""

from __future__ import annotations

import os

import keras
import pytest

from tests.conftest import free_port, run_workers

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "sharding_worker.py")

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution shards variables on the JAX backend only",
)


def test_sharded_model_resumes_bitwise_and_restores_onto_other_layouts(tmp_path):
    [result] = run_workers([[WORKER, str(tmp_path)]], timeout=300)
    assert result["devices"] == 4 and result["sharded"]
    # Interrupted after batch 1 of epoch 1; resumed after that very batch.
    assert result["restored_from"][1:] == [1, 1]
    assert result["resume_equals_uninterrupted"]
    assert result["layout_after_resume"] == "P(None, 'model')"
    # The same backup onto a (2, 2) mesh, replicated over 4 devices, and one
    # device: every variable bitwise equal, in the target's own layout.
    assert result["model_parallel_2x2"] == {
        "equal": True, "kernel_spec": "P(None, 'model')", "kernel_devices": 4}
    assert result["data_parallel_4"] == {
        "equal": True, "kernel_spec": "P(None, None)", "kernel_devices": 4}
    assert result["single_device"] == {
        "equal": True, "kernel_spec": "SingleDeviceSharding",
        "kernel_devices": 1}


MULTI = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     "multiprocess_worker.py")


def test_multi_process_job_is_refused_clearly_in_every_process(tmp_path):
    # Multi-process backups are not built yet (docs/distributed.md): every
    # process must fail at once with a clear error, none may hang.
    port = str(free_port())
    results = run_workers(
        [[MULTI, str(tmp_path), str(i), port] for i in range(2)], timeout=240
    )
    for index, result in enumerate(results):
        assert result["fit"] == "refused" and result["processes"] == 2
        assert "does not back up multi-process JAX jobs yet" in result["error"]
        assert f"jax.process_index()={index}" in result["error"]
    # Nothing was written: the refusal comes before the lock.
    assert not (tmp_path / "backup").exists()
