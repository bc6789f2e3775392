"""SIGKILL at random moments, mid-write included: the restore is always exact.

The harness is `tests/crash_worker.py` (its docstring explains the design).
CI runs 20 kills; `FASTBACKUP_CRASH_KILLS=500 python -m pytest -q -s
tests/test_crash.py` runs a long campaign (`FASTBACKUP_CRASH_SEED` picks the
random seed of kill steps, delays and write modes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import worker_env

# Read at import: the autouse fixture in conftest.py removes FASTBACKUP_*
# variables before each test runs.
CRASH_KILLS = int(os.environ.get("FASTBACKUP_CRASH_KILLS", "20"))
CRASH_SEED = int(os.environ.get("FASTBACKUP_CRASH_SEED", "0"))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "crash_worker.py")


def test_sigkill_at_random_moments_restores_a_state_training_really_had(
    tmp_path,
):
    env = worker_env()
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, WORKER, "--kills", str(CRASH_KILLS),
         "--seed", str(CRASH_SEED), "--workdir", str(tmp_path / "work"),
         "--out", str(out)],
        capture_output=True, text=True, env=env,
        timeout=120 + 30 * CRASH_KILLS,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    print()
    print(proc.stdout.strip())
    print("per mode:", json.dumps(summary["modes"]))
    print("steps lost histogram:", summary["steps_lost_histogram"])

    # The uninterrupted run restored exactly the reference's final state.
    assert summary["problems"] == []
    assert summary["kills"] == CRASH_KILLS
    assert summary["hangs"] == 0, summary["failures"]
    # Every kill left a checkpoint that loads...
    assert summary["unloadable"] == 0, summary["failures"]
    # ...whose weights, optimizer state, metrics, epoch and batch are,
    # bitwise, those of one step the training really went through...
    assert summary["inconsistent"] == 0, summary["failures"]
    assert summary["restored_from_future"] == 0, summary["failures"]
    # ...and a checkpoint that existed before the kill is never lost.
    assert summary["lost"] == 0, summary["failures"]
    # Kills hit writers mid-file, and the next start removed their
    # temporary files.
    assert summary["killed_mid_write"] >= 1
    assert summary["temp_files_left_after_restore"] == 0, summary["failures"]
