"""Opt-in SIGTERM handling: save at the next step boundary, stop, keep the
backup, exit cleanly, and chain the previous handler after the save.

Each scenario runs `tests/preempt_worker.py` in its own process (a signal
handler is process-wide state); the processes run concurrently.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import keras
import pytest

from tests.conftest import worker_env


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "preempt_worker.py")
STEPS_PER_EPOCH = 8


def _env(**extra):
    env = worker_env()
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.update(extra)
    return env


def _start(tmp_path, mode, **env):
    backup = str(tmp_path / f"{mode}-backup")
    progress = str(tmp_path / f"{mode}-progress")
    proc = subprocess.Popen(
        [sys.executable, WORKER, mode, backup, progress],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(**env),
    )
    return proc, backup, progress


def _result(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    [line] = [l for l in out.splitlines() if l.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):]), err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the scenarios at once; the external one gets SIGTERM once it
    has trained a while."""
    tmp_path = tmp_path_factory.mktemp("preempt")
    procs = {
        "self": _start(tmp_path, "self", FASTBACKUP_HANDLE_SIGTERM="1"),
        "chain": _start(tmp_path, "chain"),
        "external": _start(tmp_path, "external"),
        "in_step": _start(tmp_path, "in_step"),
    }
    proc, backup, progress = procs["external"]
    assert proc.stdout.readline().strip() == "READY"
    # SIGTERM at some point in epoch 2 or later: mid-training, not at start.
    deadline = time.monotonic() + 240
    while True:
        try:
            with open(progress, "rb") as f:
                data = f.read(8)
            steps = struct.unpack("<q", data)[0] if len(data) == 8 else 0
        except FileNotFoundError:
            steps = 0
        if steps >= 2 * STEPS_PER_EPOCH + 3:
            break
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    results = {}
    for mode, (p, b, _) in procs.items():
        result, err = _result(p)
        results[mode] = (result, b, err)
    return results


def test_sigterm_saves_at_the_next_step_boundary_and_stops(runs):
    result, backup, err = runs["self"]
    # SIGTERM arrived just before batch 3 of epoch 1 ran: that batch is the
    # next step boundary. Its state is saved, and nothing trains after it.
    assert result["batches_seen"][-1] == [1, 3]
    assert result["checkpoints"] == [[2, 1, 3, "batch_end"]]
    assert result["epochs_in_history"] == 2  # epoch 1 stopped early
    # The backup is kept for the restarted job despite delete_checkpoint.
    assert result["backup_exists"]
    assert result["handler_restored"]
    assert "SIGTERM: saved epoch 1 batch 3" in err


def test_external_sigterm_chains_the_previous_handler_after_the_save(runs):
    result, backup, _ = runs["external"]
    [delivered] = result["delivered_at"]
    [(step, epoch, batch, position)] = result["checkpoints"]
    saved = epoch * STEPS_PER_EPOCH + batch + 1
    # Saved at the first step boundary after the signal reached Python:
    # the step then in flight (or the one whose callbacks were running).
    assert saved in (delivered, delivered + 1)
    assert position == "batch_end"
    # Training stopped right there.
    assert result["steps"] == saved
    # The previous handler ran exactly once, after the checkpoint was
    # durable: it saw it on disk, verified.
    [call] = result["user_calls"]
    assert call["steps"] == saved
    assert call["checkpoints"] == result["checkpoints"]
    assert result["backup_exists"] and result["handler_restored"]


def test_sigterm_after_a_fit_that_raised_reaches_the_previous_handler(runs):
    result, _, _ = runs["chain"]
    # The fit raised, so on_train_end never restored the previous handler;
    # a SIGTERM arriving afterwards must not be swallowed.
    assert result["after_raise"]["user_calls"] == 1


def test_resumed_fit_with_the_same_callback_chains_once(runs):
    result, _, _ = runs["chain"]
    resumed = result["resumed"]
    assert resumed["user_calls"] == 2
    assert resumed["checkpoints"] == [resumed["checkpoints"][0]]
    step, epoch, batch, position = resumed["checkpoints"][0]
    assert (epoch, batch, position) == (2, 4, "batch_end")
    assert resumed["last_call"]["checkpoints"] == resumed["checkpoints"]
    assert resumed["handler_restored"]


def test_sigterm_after_the_last_step_keeps_the_backup(runs):
    result, _, _ = runs["chain"]
    last = result["after_last_step"]
    # The signal came when no step boundary was left: the final state is
    # saved and kept (a restarted job restores it and has nothing left to
    # train), then the previous handler runs.
    assert last["user_calls"] == 3
    assert last["backup_exists"]
    [(step, epoch, batch, position)] = last["checkpoints"]
    assert (epoch, batch, position) == (2, 0, "epoch_end")
    assert last["last_call"]["checkpoints"] == last["checkpoints"]
    assert last["handler_restored"]


def test_sigterm_inside_a_step_saves_the_state_that_step_produced(runs):
    result, _, _ = runs["in_step"]
    [delivered] = result["delivered"]
    epoch, batch, position = result["position"]
    saved = epoch * STEPS_PER_EPOCH + batch + 1
    assert position == "batch_end"
    assert saved in (delivered["steps"], delivered["steps"] + 1)
    assert result["steps"] == saved
    # The checkpoint holds exactly the state training stopped with.
    assert result["state_matches"]
    if keras.backend.backend() != "tensorflow":
        # JAX and torch fetch the batch on the main thread, inside the step
        # (TensorFlow fetches it on a tf.data thread, at no fixed point), so
        # here the handler ran mid-step: on JAX, after the trainer read the
        # state that the step then donated.
        assert delivered["in_fetch"]
        assert (epoch, batch) == (1, 3)
