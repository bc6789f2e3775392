"""A model sharded over 4 devices of one JAX process: resume and reshard.

The training runs in its own interpreter (`tests/sharding_worker.py`):
`JAX_NUM_CPU_DEVICES` must be set before JAX initialises.
"""

from __future__ import annotations

import os

import keras
import pytest

from tests.conftest import (dense_model, follow_states, free_port, run_workers,
                            worker_env)

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


def two_processes(scenario: str, workdir, timeout: float = 300,
                  check: bool = True) -> list:
    port = str(free_port())
    return run_workers(
        [[MULTI, scenario, str(workdir), str(i), port] for i in range(2)],
        timeout=timeout, check=check,
    )


@pytest.fixture(scope="module")
def model_parallel_job(tmp_path_factory):
    """The `model` scenario of two processes, run once for several tests."""
    workdir = tmp_path_factory.mktemp("model-parallel")
    return workdir, two_processes("model", workdir)


def test_two_processes_resume_bitwise_with_a_kernel_sharded_across_them(
        model_parallel_job):
    _, results = model_parallel_job
    for result in results:
        assert result["processes"] == 2 and result["sharded"]
        # Interrupted after batch 4 of epoch 1, whose last save was batch 3.
        assert result["restored_from"][1:] == [1, 3]
        assert result["resume_equals_uninterrupted"]


def test_each_process_writes_only_its_shards_and_replicated_data_once(
        model_parallel_job):
    _, results = model_parallel_job
    backup = results[0]["backup"]
    assert backup == results[1]["backup"]
    step = backup["step"]
    assert backup["parts"] == [f"ckpt-{step:012d}.part-0000{i}-of-00002.fbk"
                               for i in range(2)]
    # The manifest and both parts, no leftover of any other checkpoint.
    assert [f for f in backup["files"] if f.startswith("ckpt-")] == [
        f"ckpt-{step:012d}.fbk", *backup["parts"]]
    # Every byte of the state is stored exactly once in the job: the parts
    # hold disjoint shards, replicated variables in process 0's only.
    state = results[0]["state_bytes"]
    assert sum(backup["raw_bytes"]) == state
    # The kernels are split between the processes: each part holds a share.
    assert 0 < backup["raw_bytes"][1] < backup["raw_bytes"][0] < state
    for result in results:
        assert 0 < result["bytes_written"]


def test_the_backup_restores_onto_other_layouts_of_two_processes(
        model_parallel_job):
    _, results = model_parallel_job
    for result in results:
        assert result["model_parallel_2x2"] == {
            "equal": True, "kernel_spec": "P(None, 'model')"}
        assert result["data_parallel"] == {
            "equal": True, "kernel_spec": "P(None, None)"}


def test_the_backup_of_two_processes_restores_onto_one_process(
        model_parallel_job):
    workdir, _ = model_parallel_job
    [result] = run_workers([[MULTI, "single", str(workdir), "0", "0"]],
                           timeout=240)
    assert result["model_parallel_4"] == {
        "equal": True, "kernel_spec": "P(None, 'model')", "devices": 4}
    assert result["single_device"] == {
        "equal": True, "kernel_spec": "SingleDeviceSharding", "devices": 1}


def test_a_single_process_backup_restores_onto_two_processes(tmp_path):
    # The worker's model, trained here in one process
    # (one device): its checkpoint holds whole tensors, which each process
    # of the job cuts into the pieces its devices hold.
    import numpy as np

    import fastbackup
    from fastbackup.snapshot import collect_variables

    model = dense_model(seed=7)
    x = np.random.default_rng(1).normal(size=(64, 8)).astype("float32")
    model.fit(x, x[:, :4], epochs=2, batch_size=16, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(tmp_path / "whole",
                                    delete_checkpoint=False)])
    np.savez(tmp_path / "whole-expected.npz", *[
        np.array(v.numpy()) for _, v in collect_variables(model)])
    for result in two_processes("from-whole", tmp_path):
        assert result["sharded"]
        assert result["restored_from"] == [1, 2, 0]
        assert result["equal"]


def test_a_part_that_fails_in_one_process_fails_the_checkpoint_everywhere(
        model_parallel_job):
    _, results = model_parallel_job
    for index, result in enumerate(results):
        failure = result["failure"]
        # Process 1's third part write failed: checkpoint step 2 is not
        # committed, and both processes were told (warned, under
        # FASTBACKUP_ON_ERROR=warn) and trained on; the later saves commit.
        assert len(failure["warnings"]) == 1, failure
        warning = failure["warnings"][0]
        assert "No space left on device (injected)" in warning
        if index == 0:
            assert "process 1: OSError" in warning
            assert "checkpoint step 2 is not committed" in warning
        assert failure["saves"] == 7
        assert failure["last_durable"][0] == 7
        assert failure["committed"] == [7]


def test_a_second_job_on_a_locked_backup_is_refused_in_every_process(
        model_parallel_job):
    _, results = model_parallel_job
    for result in results:
        assert "backup_dir is locked by another process" in result["locked"]
    assert "process 0 could not lock the backup" in results[1]["locked"]


# Every process layout a job may have: processes x CPU devices per process
# (one device per process is the layout of one process per GPU). A layout
# whose backup another restores comes first.
LAYOUTS = [(4, 1), (2, 2), (1, 1), (1, 2), (2, 1), (4, 2)]
# Backups restored onto another layout: source -> target.
RESHARDS = [((4, 1), (2, 2)), ((2, 2), (1, 1))]


class LayoutRuns:
    """One `layout` job per layout, run on first use and kept for the
    module: each job's results serve every test of its layout, and a job
    that restores another layout's backups runs that layout's job first."""

    def __init__(self, root) -> None:
        self.root = root
        self.results: dict[tuple[int, int], list] = {}

    def workdir(self, layout: tuple[int, int]):
        return self.root / f"{layout[0]}x{layout[1]}"

    def __call__(self, layout: tuple[int, int]) -> list:
        if layout not in self.results:
            sources = [s for s, t in RESHARDS if t == layout]
            extra = []
            for source in sources:
                self(source)
                extra = [str(self.workdir(source))]
            processes, devices = layout
            workdir = self.workdir(layout)
            workdir.mkdir()
            port = str(free_port())
            self.results[layout] = run_workers(
                [[MULTI, "layout", str(workdir), str(i), port, str(processes),
                  str(devices), *extra] for i in range(processes)],
                timeout=240,
            )
        return self.results[layout]


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory) -> LayoutRuns:
    return LayoutRuns(tmp_path_factory.mktemp("layouts"))


def _ids(layout: tuple[int, int]) -> str:
    return f"{layout[0]}x{layout[1]}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_every_process_layout_resumes_bitwise(layout_runs, layout):
    processes, devices = layout
    results = layout_runs(layout)
    assert len(results) == processes
    sharded = processes * devices > 1
    for result in results:
        assert (result["processes"], result["local_devices"]) == layout
        for kind, spec in (("model", "P(None, 'model')"),
                           ("data", "P(None, None)")):
            run = result[kind]
            # A snapshot before any train step (where JAX's
            # `addressable_shards` fails) holds the exact values.
            assert run["never_stepped_snapshot_exact"]["exact"], kind
            if processes > 1:  # (one process writes whole arrays)
                assert run["regions_are_replica_0"], kind
            # Interrupted after batch 2 of epoch 1, saved after batch 1.
            assert run["restored_from"] == [2, 1, 1], kind
            assert run["resume_equals_uninterrupted"], kind
            assert run["kernel_spec"] == (
                spec if sharded else "SingleDeviceSharding"), kind
            assert run["kernel_devices"] == processes * devices, kind
    for kind in ("model", "data"):
        # 16 variables, some in several pieces, copied somewhere in the job.
        assert sum(r[kind]["never_stepped_snapshot_exact"]["pieces"]
                   for r in results) >= 16, kind


@pytest.mark.parametrize("layout", LAYOUTS, ids=_ids)
def test_every_process_layout_writes_each_byte_once(layout_runs, layout):
    processes, _ = layout
    results = layout_runs(layout)
    for kind in ("model", "data"):
        backup = results[0][kind]["backup"]
        assert all(r[kind]["backup"] == backup for r in results), kind
        state = results[0][kind]["state_bytes"]
        # Disjoint parts: every byte of the state stored exactly once.
        assert sum(backup["raw_bytes"]) == state, kind
        if processes == 1:
            assert backup["parts"] == [], kind  # one whole checkpoint
            continue
        assert len(backup["parts"]) == processes, kind
        if kind == "model":
            # Kernels and biases are split over every process.
            assert all(0 < n < state for n in backup["raw_bytes"]), backup
        else:
            # Replicated everywhere: written by the first device's process.
            assert backup["raw_bytes"] == [state] + [0] * (processes - 1)


@pytest.mark.parametrize("source, target", RESHARDS,
                         ids=[f"{_ids(s)}-onto-{_ids(t)}" for s, t in RESHARDS])
def test_a_backup_restores_onto_another_process_layout(layout_runs, source,
                                                       target):
    results = layout_runs(target)
    sharded = target[0] * target[1] > 1
    for result in results:
        restored = result["restored"]
        assert sorted(restored) == ["data->data", "data->model",
                                    "model->data", "model->model"]
        for name, got in restored.items():
            spec = {"model": "P(None, 'model')",
                    "data": "P(None, None)"}[name.split("->")[1]]
            assert got == {
                "restored_from": [3, 1, 3], "equal": True,
                "kernel_spec": spec if sharded else "SingleDeviceSharding",
            }, name


def test_sigterm_to_one_process_stops_the_whole_job_at_the_same_step(tmp_path):
    results = two_processes("data", tmp_path)
    for result in results:
        assert result["processes"] == 2
        # Process 1 got the signal after batch 2 of epoch 1; every process
        # trained batch 3, saved it as one checkpoint and stopped.
        assert result["stop_training"]
        assert result["last_batch_trained"] == "1,3"
        assert result["saved"] == [0, 1, 3]
        assert result["restored_from"] == [0, 1, 3]
        assert result["resume_equals_uninterrupted"]
        assert result["backup_deleted"]


def test_two_processes_back_up_into_a_bucket(bucket_url):
    # The same job with its backup in a bucket (moto's S3, and GCS through
    # the adapter): the parts are objects, the manifest is committed in the
    # commit record.
    results = two_processes("data", bucket_url)
    for result in results:
        assert result["saved"] == [0, 1, 3]
        assert result["restored_from"] == [0, 1, 3]
        assert result["resume_equals_uninterrupted"]
        assert result["backup_deleted"]


def test_each_process_reads_only_the_byte_ranges_of_its_shards(bucket):
    """A restore from a bucket in a 2-process job: each process fetches the
    byte ranges of the shards its devices hold (and of the replicated
    variables), not every part whole. The kernel (512 x 2048) is split
    over the 4 devices, 2 per process: each process needs half of the
    kernel and its Adam moments, about half of what the parts hold."""
    import obstore

    from fastbackup.stores.location import open_store
    from fastbackup.stores.names import PART_RE
    from tests.object_servers import FaultProxy

    proxies = [FaultProxy(bucket.server.port) for _ in range(2)]
    try:
        port = str(free_port())
        results = run_workers(
            [[MULTI, "ranged", bucket.url, str(i), port,
              bucket.endpoint_variable(), proxies[i].endpoint]
             for i in range(2)],
            timeout=300,
        )
        received = [p.received for p in proxies]
    finally:
        for p in proxies:
            p.close()
    store = open_store(bucket.url)
    sizes = {m["path"].rsplit("/", 1)[1]: m["size"]
             for m in obstore.list(store.client, prefix=store.prefix).collect()}
    parts = [size for name, size in sizes.items() if PART_RE.match(name)]
    total = sum(parts)
    assert len(parts) == 2 and total > 12 << 20
    for result, got in zip(results, received):
        assert result["sharded"]
        # The checkpoint of the end of epoch 1: resumed at epoch 2.
        assert result["restored_from"][1:] == [2, 0]
        assert result["restored_equals_saved"]
        # Whole parts would be `total` for every process (each needs a
        # piece of both: its shards, and the replicated variables process 0
        # wrote).
        assert 0.4 * total < got < 0.6 * total, (got, total)


@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
def test_a_killed_job_restarted_at_once_resumes_from_its_bucket(bucket, tmp_path):
    """Both processes of a job training into a bucket killed with `kill -9`,
    the job started again at once: process 0 takes over the dead job's
    lease without waiting for it to lapse (60 s), and every process
    restores the state it had at the checkpoint's step. (The take-over
    itself is tested on S3 and GCS in tests/test_object_store.py.)"""
    import signal
    import subprocess
    import sys
    import time

    from fastbackup.stores.location import open_store

    port = str(free_port())
    # stderr to files: a pipe nobody reads would stop a chatty worker.
    logs = [open(tmp_path / f"stderr-{i}", "w+") for i in range(2)]  # noqa: SIM115
    procs = [subprocess.Popen(
        [sys.executable, MULTI, "crash-train", bucket.url, str(i), port],
        stdout=subprocess.PIPE, stderr=logs[i], text=True,
        env=worker_env()) for i in range(2)]
    states, readers = follow_states(procs)
    store = open_store(bucket.url)
    try:
        deadline = time.monotonic() + 240
        # Killed mid-training, once a few checkpoints are committed.
        while (len(store.list_checkpoints()) < 1 or min(map(len, states)) < 6) \
                and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [
                (tmp_path / f"stderr-{i}").read_text()[-3000:] for i in range(2)]
            time.sleep(0.05)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=60)
        for log in logs:
            log.close()
    for t in readers:
        t.join(timeout=60)
    committed = store.list_checkpoints()
    assert committed, "a checkpoint was committed before the kill"

    port = str(free_port())
    results = run_workers(
        [[MULTI, "crash-resume", bucket.url, str(i), port] for i in range(2)],
        timeout=240,
    )
    for i, result in enumerate(results):
        step, epoch, batch = result["restored_from"]
        assert step == committed[0][0]
        # Not the lease's 60 s: the dead holder was seen dead at once.
        assert result["seconds"] < 30, result
        assert result["digest"] == states[i][(epoch, batch)], (i, epoch, batch)


def test_kill_9_of_one_process_mid_save_restores_the_last_committed(tmp_path):
    # Process 1 dies half way through its part of the fourth checkpoint
    # (step 3); process 0 either notices (its peer is gone) or hangs in a
    # collective until the deadline kills it. Either way step 3 is never
    # committed.
    first = two_processes("kill", tmp_path, timeout=150, check=False)
    assert first[1][0] == -9 and first[1][1] is None, first[1][2]
    results = two_processes("after-kill", tmp_path)
    for result in results:
        before = result["files_before"]
        assert result["committed_before"] == [2]
        assert "ckpt-000000000002.fbk" in before
        assert "ckpt-000000000003.fbk" not in before
        # The next run restores step 2 (epoch 0, batch 2), equal to the
        # uninterrupted run's state after that batch, bitwise...
        assert result["restored_from"] == [2, 0, 2]
        assert result["restored_equals_reference_at_its_step"]
        # ...after removing what the killed save left: no part of step 3,
        # no temporary file.
        assert [f for f in result["files_after_restore"]
                if f.startswith("ckpt-")] == [
            "ckpt-000000000002.fbk",
            "ckpt-000000000002.part-00000-of-00002.fbk",
            "ckpt-000000000002.part-00001-of-00002.fbk",
        ]
        # (Process 0 may be writing the model's config meanwhile.)
        assert not [f for f in result["files_after_restore"]
                    if f.startswith(".ckpt-")]
        assert result["resume_equals_uninterrupted"]
