"""A model sharded over 4 devices of one JAX process: resume and reshard.

The training runs in its own interpreter (`tests/sharding_worker.py`):
`JAX_NUM_CPU_DEVICES` must be set before JAX initialises.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import keras
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "sharding_worker.py")

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution shards variables on the JAX backend only",
)


def test_sharded_model_resumes_bitwise_and_restores_onto_other_layouts(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FASTBACKUP_") or k == "FASTBACKUP_PURE_PYTHON"}
    proc = subprocess.run([sys.executable, WORKER, str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FASTBACKUP_") or k == "FASTBACKUP_PURE_PYTHON"}
    procs = [
        subprocess.Popen([sys.executable, MULTI, str(tmp_path), str(i),
                          str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
        for i in range(2)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            [line] = [l for l in out.splitlines() if l.startswith("RESULT ")]
            results.append(json.loads(line[len("RESULT "):]))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    for index, result in enumerate(results):
        assert result["fit"] == "refused" and result["processes"] == 2
        assert "does not back up multi-process JAX jobs yet" in result["error"]
        assert f"jax.process_index()={index}" in result["error"]
    # Nothing was written: the refusal comes before the lock.
    assert not (tmp_path / "backup").exists()
