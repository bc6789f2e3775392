"""The chaos harness (`benchmarks/chaos.py`) in a short campaign, fixed seed.

Every fault kind once on the store that takes it (the local directory, or
one of the buckets through the fault proxy), one two-job race per store,
three jobs at once on each bucket, and one two-process JAX job with one
process killed. Each trial restarts the job at once and checks
that nothing was lost, the restored state is bitwise the one of its step,
and nothing is left behind once the restarted `fit` ends. The long
campaigns and their table are in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import pytest

from tests.conftest import worker_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The faults only a bucket meets, plus a kill mid-upload and one between
# upload and commit (the other kills and SIGTERMs are the local trials'),
# split between the two servers: each kind once in CI, every kind on both
# in the long campaigns.
BUCKET_FAULTS = {
    "s3": "kill9-write,drop,503,outage",
    "gs": "kill9-before-commit,500,stall,lease-lost",
}


def _campaign(tmp_path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.chaos", "--seed", "0",
         "--workdir", str(tmp_path / name), "--out", str(out), *args],
        check=False, cwd=REPO, env=worker_env(), capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(proc.stdout)
    return json.loads(out.read_text())


def _assert_clean(summary: dict, stores: list[str], kinds: int) -> None:
    for store in stores:
        table = summary["stores"][store]
        assert table["trials"] == kinds, table
        assert all(n == 1 for n in table["faults"].values() if n), table
        assert table["ok"] == kinds, summary["failures"]
        assert table["left_behind"] == 0, summary["failures"]
        assert table["max_steps_lost"] is not None
    assert summary["failures"] == []


def test_a_short_campaign_on_the_local_directory(tmp_path):
    summary = _campaign(tmp_path, "local", "--stores", "local",
                        "--trials", "10", "--races", "1", "--jobs", "0")
    _assert_clean(summary, ["local"], 10)
    assert summary["races"]["local"] == {"runs": 1, "exactly_one_won": 1}


@pytest.mark.parametrize("store", sorted(BUCKET_FAULTS))
def test_a_short_campaign_on_a_bucket(tmp_path, store):
    summary = _campaign(tmp_path, store, "--stores", store,
                        "--faults", BUCKET_FAULTS[store], "--trials", "4",
                        "--races", "1", "--jobs", "3")
    _assert_clean(summary, [store], 4)
    assert summary["races"][store] == {"runs": 1, "exactly_one_won": 1}
    assert [f["ok"] for f in summary["fleets"]] == [True]


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="a JAX job whatever the backend: run once, in the JAX pass",
)
def test_one_process_of_a_two_process_jax_job_killed(tmp_path):
    summary = _campaign(tmp_path, "two", "--stores", "local", "--layouts", "2",
                        "--trials", "1", "--races", "0", "--jobs", "0")
    _assert_clean(summary, ["local, 2 JAX processes"], 1)
    assert summary["stores"]["local, 2 JAX processes"]["faults"] == {
        "kill9-one-of-two": 1}
