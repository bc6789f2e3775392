"""Backups in an object store: `fastbackup.stores.object_store` against real
servers on 127.0.0.1, each test on S3 (moto) and GCS (fake-gcs-server behind
the XML-API adapter of `tests/gcs_adapter.py`) alike: end to end with Keras
models, under faults injected by a proxy, and across `kill -9`."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import keras
import numpy as np
import obstore
import pytest

import fastbackup
from fastbackup import format as fmt
from fastbackup.errors import BackupDirLockedError, BackupWriteError
from fastbackup.snapshot import HostSnapshot, TensorSpec
from fastbackup.stores import lease, locks, object_store
from fastbackup.stores.base import WriteCancelled
from fastbackup.stores.local import LocalStore
from fastbackup.stores.location import open_store
from fastbackup.stores.names import MODEL_CONFIG_NAME, part_name
from tests.conftest import (
    InterruptAt,
    all_state,
    assert_state_equal,
    fresh_model,
    make_data,
    make_model,
    worker_env,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_TIMEOUT = 120


def _encoded(step=0, value=1.0, n=16):
    a = np.full((n,), value, "float32")
    b = np.arange(n, dtype="float64")
    snap = HostSnapshot(
        [TensorSpec("model.0", "w", a.dtype, a.shape),
         TensorSpec("model.1", "b", b.dtype, b.shape)],
        [a, b], epoch=step, batch=0,
    )
    return fmt.encode(snap, fmt.CompressionPolicy(None), step)


def _names(store):
    return sorted(store._list_names())


class _Owner:
    def flush(self):
        pass


# URLs -------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://host/x", "s3:/bucket/x", "hdfs://n/p",
                                 "memory:///x", "S3X://b/p"])
def test_unsupported_url_raises_and_creates_nothing(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="Received: backup_dir=") as info:
        fastbackup.BackupAndRestore(url)
    assert "s3://" in str(info.value) and "gs://" in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("url", ["s3://bucket", "s3://bucket/", "gs://b/",
                                 "s3://bucket/a/../b", "s3://B_AD/x"])
def test_object_url_needs_bucket_and_own_prefix(url):
    with pytest.raises(ValueError, match="Received: backup_dir="):
        open_store(url)


def test_open_store_picks_one_store_per_kind(tmp_path, bucket_url):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    local = open_store(f"file://{tmp_path}")
    assert isinstance(local, LocalStore)
    assert local.directory == str(tmp_path)
    remote = open_store(bucket_url + "/")
    assert isinstance(remote, object_store.ObjectStore)
    assert remote.location == bucket_url
    assert open_store(remote) is remote


@pytest.mark.parametrize("name", ["FASTBACKUP_LEASE_SECONDS",
                                  "FASTBACKUP_RETRY_SECONDS",
                                  "FASTBACKUP_REQUEST_TIMEOUT_SECONDS"])
@pytest.mark.parametrize("raw", ["0", "-1", "abc", "nan", "1e9"])
def test_seconds_variables_are_validated(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(fastbackup.ConfigError, match=name):
        fastbackup.BackupAndRestore("s3://bucket/prefix")


# Store operations ---------------------------------------------------------------


def test_commit_is_the_same_file_as_on_disk(tmp_path, bucket, monkeypatch):
    bucket_url = bucket.url
    # Larger than a part: a multipart upload with parts in flight together.
    monkeypatch.setattr(object_store, "PART_BYTES", 5 << 20)
    encoded = _encoded(3, n=3 << 20)  # 12 MiB + 24 MiB
    store = open_store(bucket_url)
    result = store.commit(3, encoded, sync=True)
    assert result.path == f"{bucket_url}/ckpt-000000000003.fbk"
    assert store.list_checkpoints() == [(3, result.path)]
    local = LocalStore(str(tmp_path)).commit(3, _encoded(3, n=3 << 20), sync=False)
    with open(local.path, "rb") as f:
        on_disk = f.read()
    assert result.nbytes == len(on_disk)
    data = obstore.get(store.client, store._key("ckpt-000000000003.fbk")).bytes()
    assert bytes(data) == on_disk
    with store.open_checkpoint(result.path) as reader:
        reader.verify()
        assert reader.step == 3
        assert reader.path == result.path
    assert bucket.multipart_uploads() == []


def test_small_commit_and_prune_keep_the_record_first(bucket_url):
    store = open_store(bucket_url)
    assert store.list_checkpoints() == [] and not store.exists()
    for step in range(3):
        store.commit(step, _encoded(step), sync=True)
    assert [s for s, _ in store.list_checkpoints()] == [2, 1, 0]
    store.prune(keep=2)
    assert [s for s, _ in store.list_checkpoints()] == [2, 1]
    assert _names(store) == ["COMMITTED", "ckpt-000000000001.fbk",
                             "ckpt-000000000002.fbk"]


def test_uncommitted_objects_are_removed_committed_kept(bucket_url):
    store = open_store(bucket_url)
    store.commit(0, _encoded(0), sync=True)
    # A writer killed between its data object and the commit record.
    obstore.put(store.client, store._key("ckpt-000000000001.fbk"), b"partial")
    obstore.put(store.client, store._key("notes.txt"), b"not ours to remove")
    assert [s for s, _ in store.list_checkpoints()] == [0]
    removed = store.remove_temp_files()
    assert removed == [f"{bucket_url}/ckpt-000000000001.fbk"]
    assert _names(store) == ["COMMITTED", "ckpt-000000000000.fbk", "notes.txt"]


def test_cancelled_upload_leaves_nothing(bucket, monkeypatch):
    bucket_url = bucket.url
    monkeypatch.setattr(object_store, "PART_BYTES", 5 << 20)
    store = open_store(bucket_url)
    store.commit(0, _encoded(0), sync=True)
    encoded = _encoded(1, n=3 << 20)
    cancel = threading.Event()
    # Cancelled after the first segment went out: mid multipart upload.
    real = encoded.segments
    encoded.segments = [real[0], real[1], _SetOnLen(real[2], cancel)]
    with pytest.raises(WriteCancelled):
        store.commit(1, encoded, sync=True, cancel=cancel)
    assert _names(store) == ["COMMITTED", "ckpt-000000000000.fbk"]
    assert bucket.multipart_uploads() == []


class _SetOnLen(bytes):
    """A segment that sets `event` when the writer measures it."""

    def __new__(cls, data, event):
        obj = super().__new__(cls, bytes(data))
        obj.event = event
        return obj

    def __len__(self):
        self.event.set()
        return super().__len__()


def test_small_objects_roundtrip_and_go_with_the_backup(bucket_url, tmp_path):
    for store in (open_store(bucket_url),
                  open_store(str(tmp_path / "b"))):
        owner = _Owner()
        store.acquire_lock(owner, owner.flush)
        assert store.read_object("model-config.json") is None
        store.write_object("model-config.json", b'{"a": 1}')
        store.write_object("model-config.json", b'{"a": 2}')
        assert store.read_object("model-config.json") == b'{"a": 2}'
        for bad in ("../x", ".hidden", "a/b", "ckpt-000000000001.fbk", ""):
            with pytest.raises(ValueError, match="Received: name="):
                store.write_object(bad, b"")
        store.remove_all()
        store.release_lock(owner)
        assert not store.exists()


def test_damaged_commit_record_is_an_error_naming_it(bucket_url):
    store = open_store(bucket_url)
    obstore.put(store.client, store._key("COMMITTED"), b"{not json")
    with pytest.raises(OSError, match="commit record is damaged") as info:
        store.list_checkpoints()
    assert info.value.filename == f"{bucket_url}/COMMITTED"


# Lease lock ---------------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from fastbackup.stores.location import open_store
    class Owner:
        def flush(self): pass
    owner = Owner()
    store = open_store({url!r}, lease_seconds={lease})
    store.acquire_lock(owner, owner.flush)
    print("held", flush=True)
    time.sleep(600)
""")


def _start_holder(url, lease):
    env = worker_env()
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(repo=REPO, url=url, lease=lease)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    ready = threading.Event()
    threading.Thread(target=lambda: (proc.stdout.readline(), ready.set()),
                     daemon=True).start()
    if not ready.wait(SUBPROCESS_TIMEOUT):
        proc.kill()
        pytest.fail("the lease holder did not start")
    assert proc.poll() is None, proc.stderr.read()
    return proc


def _lease_body(store):
    return json.loads(bytes(obstore.get(store.client, store._key("LEASE")).bytes()))


def test_second_job_is_refused_while_the_first_renews(bucket_url):
    # Lifetimes of 3 s (renewed every 0.75 s) leave a loaded machine's
    # scheduling delays far from the expiry.
    holder = _start_holder(bucket_url, lease=3.0)
    try:
        owner = _Owner()
        # Checked over more than a lifetime: the holder kept renewing, and
        # a live holder on this host is refused at once, without a wait.
        for _ in range(3):
            store = open_store(bucket_url, lease_seconds=3.0)
            start = time.monotonic()
            with pytest.raises(BackupDirLockedError, match="locked by another job"):
                store.acquire_lock(owner, owner.flush)
            assert time.monotonic() - start < 1.5
            time.sleep(1.6)
    finally:
        holder.kill()
        holder.wait(timeout=SUBPROCESS_TIMEOUT)


def test_lease_taken_over_behind_our_back_stops_commits(bucket_url):
    store = open_store(bucket_url, lease_seconds=0.8)
    owner = _Owner()
    store.acquire_lock(owner, owner.flush)
    try:
        # Another job that judged the lease expired (a paused VM) took it.
        obstore.put(store.client, store._key("LEASE"), b'{"owner": "x"}')
        deadline = time.monotonic() + 10
        lease = locks.held(store.location).handle
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.lost
        with pytest.raises(BackupDirLockedError, match="lease on backup_dir was lost"):
            store.commit(0, _encoded(0), sync=True)
        assert store.list_checkpoints() == []
    finally:
        store.release_lock(owner)
    # Not ours any more: the other job's lease stays.
    assert "LEASE" in _names(store)


def test_same_process_rules_match_the_local_lock(bucket_url):
    store = open_store(bucket_url, lease_seconds=5)
    first, second = _Owner(), _Owner()
    store.acquire_lock(first, first.flush)
    errors = []

    def other_thread():
        try:
            store.acquire_lock(second, second.flush)
        except BackupDirLockedError as e:
            errors.append(e)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join(timeout=30)
    assert len(errors) == 1 and "this process" in str(errors[0])
    # Same thread: the interrupted fit's callback is taken over.
    store.acquire_lock(second, second.flush)
    store.release_lock(first)  # not the holder any more: no effect
    assert "LEASE" in _names(store)
    store.release_lock(second)
    assert "LEASE" not in _names(store)


# Taking over a dead job's lease -----------------------------------------------------

# A lease long enough that a take-over within it cannot be its expiry.
LONG_LEASE = 60.0


def _wait_for_state(pid, states):
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while time.monotonic() < deadline:
        stat = lease.proc_stat(pid)
        if stat is None or stat[0] in states:
            return stat
        time.sleep(0.01)
    pytest.fail(f"pid {pid} never reached state {states}")


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_killed_holder_on_this_host_is_taken_over_at_once(
        bucket_url, caplog, reaped):
    holder = _start_holder(bucket_url, lease=LONG_LEASE)
    store = open_store(bucket_url, lease_seconds=LONG_LEASE)
    held = _lease_body(store)
    assert held["pid"] == holder.pid and held["start"] is not None
    holder.send_signal(signal.SIGKILL)
    if reaped:
        holder.wait(timeout=SUBPROCESS_TIMEOUT)
    else:
        # Killed, not yet reaped by its parent: its pid is still there.
        assert _wait_for_state(holder.pid, ("Z", "X")) is not None
    owner = _Owner()
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="fastbackup"):
            store.acquire_lock(owner, owner.flush)
        assert time.monotonic() - start < 10  # not the 60 s expiry
        assert "its process on this host is gone" in caplog.text
        assert _lease_body(store)["pid"] == os.getpid()
    finally:
        store.release_lock(owner)
        holder.kill()
        holder.wait(timeout=SUBPROCESS_TIMEOUT)
    assert "LEASE" not in _names(store)


def _write_lease(store, **fields):
    body = {"owner": "another-job", "host": "another-host",
            "boot": "another-boot", "pidns": "pid:[1]", "pid": 4242,
            "start": "1", "seconds": 3.0, **fields}
    return obstore.put(store.client, store._key("LEASE"),
                       json.dumps(body).encode())


@pytest.mark.parametrize("same_start", [True, False],
                         ids=["its-process", "reused-pid"])
def test_a_reused_pid_is_not_mistaken_for_the_holder(bucket_url, same_start):
    # A lease recording a process of this host: the pid of a running
    # process, with its start time (that process holds it) or another one
    # (the holder died and its pid went to this process).
    other = subprocess.Popen([sys.executable, "-c",
                              "import time; time.sleep(600)"])
    try:
        me = lease.this_process()
        start = lease.proc_stat(other.pid)[1]
        store = open_store(bucket_url, lease_seconds=LONG_LEASE)
        _write_lease(store, **{**me, "pid": other.pid,
                               "start": start if same_start else start + "7",
                               "expires": time.time() + LONG_LEASE})
        owner = _Owner()
        begin = time.monotonic()
        if same_start:
            with pytest.raises(BackupDirLockedError,
                               match=f"pid {other.pid}, lease valid"):
                store.acquire_lock(owner, owner.flush)
            assert _lease_body(store)["owner"] == "another-job"
        else:
            store.acquire_lock(owner, owner.flush)
            assert _lease_body(store)["owner"] != "another-job"
            store.release_lock(owner)
        assert time.monotonic() - begin < 10  # no wait for the expiry
    finally:
        other.kill()
        other.wait(timeout=SUBPROCESS_TIMEOUT)


def test_another_hosts_lease_is_taken_over_once_it_lapses_not_before(
        bucket_url, caplog):
    store = open_store(bucket_url, lease_seconds=LONG_LEASE,
                       lease_wait_seconds=10)
    expires = time.time() + 2.5
    _write_lease(store, expires=expires)
    seen = []
    stop = threading.Event()

    def watch():
        # Who holds the lease, and when (wall clock, as the expiry).
        while not stop.is_set():
            seen.append((time.time(), _lease_body(store)["owner"]))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    owner = _Owner()
    try:
        with caplog.at_level(logging.WARNING, logger="fastbackup"):
            store.acquire_lock(owner, owner.flush)
        took = time.time()
        stop.set()
        watcher.join(timeout=30)
        assert took >= expires
        assert all(who == "another-job" for t, who in seen if t < expires)
        assert any(t < expires - 1 for t, _ in seen)  # it watched the wait
        waits = [r for r in caplog.records if "waiting until" in r.getMessage()]
        assert len(waits) == 1
        assert "another-host" in waits[0].getMessage()
        assert "lapsed while this job waited" in caplog.text
        assert _lease_body(store)["pid"] == os.getpid()
    finally:
        stop.set()
        store.release_lock(owner)


def test_a_lease_renewed_while_waiting_is_a_live_job(bucket_url):
    store = open_store(bucket_url, lease_seconds=LONG_LEASE,
                       lease_wait_seconds=10)
    _write_lease(store, expires=time.time() + 3.0)

    def renew():
        # The holder on the other host, alive: renews at a quarter of 3 s.
        time.sleep(0.75)
        _write_lease(store, expires=time.time() + 3.0)

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    owner = _Owner()
    start = time.monotonic()
    with pytest.raises(BackupDirLockedError, match="renewed") as info:
        store.acquire_lock(owner, owner.flush)
    assert time.monotonic() - start < 3.0  # refused at the renewal
    assert "host another-host, pid 4242" in str(info.value)
    renewer.join(timeout=30)
    assert _lease_body(store)["owner"] == "another-job"


def test_a_lease_valid_longer_than_the_wait_is_refused_at_once(bucket_url):
    store = open_store(bucket_url, lease_seconds=LONG_LEASE,
                       lease_wait_seconds=2)
    _write_lease(store, expires=time.time() + 30, seconds=30.0)
    owner = _Owner()
    start = time.monotonic()
    with pytest.raises(BackupDirLockedError,
                       match="FASTBACKUP_LEASE_WAIT_SECONDS=2"):
        store.acquire_lock(owner, owner.flush)
    assert time.monotonic() - start < 2
    assert _lease_body(store)["owner"] == "another-job"


def test_lease_wait_comes_from_the_environment(bucket_url, monkeypatch):
    monkeypatch.setenv("FASTBACKUP_LEASE_WAIT_SECONDS", "7")
    assert open_store(bucket_url).lease_wait_seconds == 7.0
    monkeypatch.setenv("FASTBACKUP_LEASE_WAIT_SECONDS", "0")
    with pytest.raises(ValueError, match="FASTBACKUP_LEASE_WAIT_SECONDS='0'"):
        open_store(bucket_url)
    monkeypatch.setenv("FASTBACKUP_LEASE_WAIT_SECONDS", "7")
    cb = fastbackup.BackupAndRestore(bucket_url)
    assert cb.config.lease_wait_seconds == 7.0
    assert cb._location_store.lease_wait_seconds == 7.0


_RESTARTED_TRAINER = textwrap.dedent("""
    import hashlib, os, sys
    sys.path.insert(0, {repo!r})
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import fastbackup
    from tests.conftest import all_state, make_data, make_model
    keras.utils.set_random_seed(1)
    x, y = make_data(n=64)
    model = make_model()

    class Digests(keras.callbacks.Callback):
        # Before fastbackup's save of the same batch (the state it saves):
        # a checkpoint committed before the kill has its line printed.
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            digest = hashlib.sha256(b"".join(
                a.tobytes() for a in all_state(self.model, metrics=False)))
            print("state", self.epoch, batch, digest.hexdigest(), flush=True)

    # resume_mid_epoch: each restart continues after the batch it restored,
    # so one (epoch, batch) names one state across all the restarts. With
    # Keras's default the epoch is retrained from its first batch, and a
    # restart killed before its first save leaves the previous run's
    # checkpoint of a position the restart printed another state for.
    model.fit(x, y, epochs=100, batch_size=8, verbose=0,
              callbacks=[Digests(),
                         fastbackup.BackupAndRestore({url!r}, save_freq=1,
                                                     delete_checkpoint=False,
                                                     resume_mid_epoch=True)])
""")


def test_kill_9_then_an_immediate_restart_restores_a_consistent_checkpoint(
        bucket_url):
    import hashlib

    # The default lease (60 s): the restart must not wait for it.
    env = worker_env()
    store = open_store(bucket_url)
    # Every state printed by every run: the newest checkpoint after a kill
    # may be one an earlier run committed.
    digests = {}
    for kill in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c",
             _RESTARTED_TRAINER.format(repo=REPO, url=bucket_url)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            deadline = time.monotonic() + SUBPROCESS_TIMEOUT
            printed = len(digests)
            while (len(digests) < printed + 4
                   and time.monotonic() < deadline):
                line = proc.stdout.readline()
                assert line, proc.stderr.read()[-3000:]
                _, epoch, batch, digest = line.split()
                digests[(int(epoch), int(batch))] = digest
            # Killed once a checkpoint is committed (the first upload may
            # still be on its way after these batches).
            while not store.list_checkpoints() and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
        # The states printed before the kill but not read yet: the newest
        # checkpoint may be of one of them.
        for line in proc.stdout.read().splitlines():
            fields = line.split()
            if len(fields) == 4 and len(fields[3]) == 64:
                digests[(int(fields[1]), int(fields[2]))] = fields[3]
        # At once: the restarted job's callback, in this process.
        start = time.monotonic()
        model = make_model()
        callback = fastbackup.BackupAndRestore(bucket_url, save_freq=1,
                                               delete_checkpoint=False)
        callback.set_model(model)
        callback.on_train_begin()
        try:
            assert time.monotonic() - start < 30  # not the lease's 60 s
            assert store.list_checkpoints()
            step, epoch, batch = callback.restored_from
            assert step == store.list_checkpoints()[0][0]
            got = hashlib.sha256(b"".join(
                a.tobytes() for a in all_state(model, metrics=False)))
            assert got.hexdigest() == digests[(epoch, batch)], (epoch, batch)
        finally:
            callback.store.release_lock(callback)


# End to end ---------------------------------------------------------------------


def test_interrupted_fit_resumes_from_the_bucket_and_empties_it(
    bucket_url, monkeypatch
):
    monkeypatch.setenv("FASTBACKUP_ON_BUSY", "wait")
    x, y = make_data()
    model = make_model()
    callback = fastbackup.BackupAndRestore(bucket_url, save_freq=3)
    # 8 batches per epoch: the 21st batch (epoch 2, batch 4) saves, then
    # the job dies.
    with pytest.raises(RuntimeError, match="Interrupting"):
        model.fit(x, y, epochs=4, batch_size=4, verbose=0,
                  callbacks=[callback, InterruptAt(2, 4)])
    callback.wait_until_finished()
    saved = all_state(model, metrics=False)
    store = open_store(bucket_url)
    [(step, url)] = store.list_checkpoints()
    assert url.startswith(bucket_url + "/")
    store.release_lock(callback)

    # A new process's fit (fresh model, fresh callback) resumes.
    resumed = fresh_model()
    again = fastbackup.BackupAndRestore(bucket_url, save_freq=3)
    again.set_model(resumed)
    again.on_train_begin()
    assert again.restored_from[0] == step
    assert again.restored_from[1:] == (2, 4)
    assert_state_equal(all_state(resumed, metrics=False), saved)
    again.store.release_lock(again)

    history = fresh_model().fit(
        x, y, epochs=4, batch_size=4, verbose=0,
        callbacks=[fastbackup.BackupAndRestore(bucket_url, save_freq=3)],
    )
    assert len(history.history["loss"]) == 2  # epochs 2 and 3
    # A successful fit empties the prefix, lease included.
    assert not store.exists()


def test_double_checkpoint_falls_back_when_the_newest_is_damaged(bucket_url):
    x, y = make_data()
    model = make_model()
    callback = fastbackup.BackupAndRestore(bucket_url, save_freq=2,
                                           double_checkpoint=True,
                                           delete_checkpoint=False)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[callback])
    store = open_store(bucket_url)
    (newest, newest_url), (previous, _) = store.list_checkpoints()
    key = store._key(newest_url.rsplit("/", 1)[1])
    data = bytearray(obstore.get(store.client, key).bytes())
    data[20] ^= 0x10
    obstore.put(store.client, key, bytes(data))
    again = fastbackup.BackupAndRestore(bucket_url, save_freq=2,
                                        double_checkpoint=True)
    again.set_model(fresh_model())
    again.on_train_begin()
    assert again.restored_from[0] == previous
    again.store.release_lock(again)


# Faults ---------------------------------------------------------------------


def test_retries_ride_out_503_and_dropped_connections(bucket_fault_proxy, bucket_url,
                                                      monkeypatch):
    monkeypatch.setattr(object_store, "PART_BYTES", 5 << 20)
    # A new store (a new client) for each stage: a server that keeps
    # connections alive (GCS) would otherwise serve the next stage over
    # pooled connections, which the faults (one per new connection) miss.
    # 500 InternalError too: S3 and GCS ask for it to be retried like 503.
    bucket_fault_proxy.inject("503", "drop", "500", "503", "drop")
    open_store(bucket_url).commit(0, _encoded(0, n=2 << 20), sync=True)  # multipart
    bucket_fault_proxy.inject("drop", "500", "503")
    [(_, url)] = open_store(bucket_url).list_checkpoints()
    bucket_fault_proxy.inject("503", "500", "drop")
    with open_store(bucket_url).open_checkpoint(url) as reader:
        reader.verify()
    assert bucket_fault_proxy.injected == {"503": 4, "drop": 4, "500": 3}


def test_a_stalled_request_times_out_and_is_retried(
    bucket_fault_proxy, bucket_url, tmp_path, monkeypatch
):
    # Read when the store is created: before open_store.
    monkeypatch.setenv("FASTBACKUP_REQUEST_TIMEOUT_SECONDS", "1")
    store = open_store(bucket_url)
    assert store.request_timeout_seconds == 1.0
    # The first request of the commit (the data object's PUT) meets a
    # server that reads it and never answers.
    bucket_fault_proxy.inject("stall")
    start = time.monotonic()
    result = store.commit(0, _encoded(0), sync=True)
    elapsed = time.monotonic() - start
    assert bucket_fault_proxy.injected == {"stall": 1}
    # Past the 1 s timeout, well short of the 120 s default and of the
    # proxy's STALL_SECONDS: the timeout set was the one honoured.
    assert elapsed < 30, f"the stalled commit took {elapsed:.1f} s"
    local = LocalStore(str(tmp_path)).commit(0, _encoded(0), sync=False)
    with open(local.path, "rb") as f:
        on_disk = f.read()
    data = obstore.get(store.client, store._key("ckpt-000000000000.fbk")).bytes()
    assert bytes(data) == on_disk
    [(step, url)] = open_store(bucket_url).list_checkpoints()
    assert (step, url) == (0, result.path)
    with open_store(bucket_url).open_checkpoint(url) as reader:
        reader.verify()


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_failed_upload_is_a_write_error_and_the_previous_checkpoint_stays(
    bucket_fault_proxy, bucket_url, monkeypatch, fault
):
    monkeypatch.setenv("FASTBACKUP_RETRY_SECONDS", "1")
    x, y = make_data()
    model = make_model()
    callback = fastbackup.BackupAndRestore(bucket_url, save_freq=2,
                                           delete_checkpoint=False)
    failing = _FailFrom(bucket_fault_proxy, fault, batch=3, backup=callback)
    with pytest.raises(BackupWriteError, match="background checkpoint write"):
        model.fit(x, y, epochs=3, batch_size=4, verbose=0,
                  callbacks=[failing, callback])
    bucket_fault_proxy.fail_all(None)
    callback.wait_until_finished(raise_errors=False)
    store = open_store(bucket_url)
    [(step, _)] = store.list_checkpoints()
    store.release_lock(callback)
    again = fastbackup.BackupAndRestore(bucket_url, save_freq=2)
    again.set_model(fresh_model())
    again.on_train_begin()
    assert again.restored_from == (step, 0, 1)
    again.store.release_lock(again)


def test_on_error_warn_keeps_training_through_a_failed_upload(
    bucket_fault_proxy, bucket_url, monkeypatch, caplog
):
    monkeypatch.setenv("FASTBACKUP_RETRY_SECONDS", "1")
    monkeypatch.setenv("FASTBACKUP_ON_ERROR", "warn")
    monkeypatch.setenv("FASTBACKUP_ON_BUSY", "wait")
    x, y = make_data()
    callback = fastbackup.BackupAndRestore(bucket_url, save_freq=2)
    failing = _FailFrom(bucket_fault_proxy, "503", batch=3, backup=callback, until=5)
    with caplog.at_level(logging.WARNING, logger="fastbackup"):
        history = make_model().fit(x, y, epochs=2, batch_size=4, verbose=0,
                                   callbacks=[failing, callback])
    assert len(history.history["loss"]) == 2
    assert "a checkpoint write failed" in caplog.text
    assert not open_store(bucket_url).exists()


class _FailFrom(keras.callbacks.Callback):
    """Makes every request fail from batch `batch` (of epoch 0) on."""

    def __init__(self, proxy, fault, batch, backup, until=None):
        super().__init__()
        self.proxy, self.fault, self.batch, self.until = proxy, fault, batch, until
        self.backup = backup
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.batch:
            # The save before this batch is committed before the outage.
            self.backup.wait_until_finished()
            self.proxy.fail_all(self.fault)
        if self.until is not None and self.seen == self.until:
            # The outage lasts until the save made during it has failed.
            self.backup.wait_until_finished(raise_errors=False)
            self.proxy.fail_all(None)


# kill -9 mid-upload ---------------------------------------------------------------

_TRAINER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras, numpy as np
    import fastbackup
    from fastbackup.stores import object_store
    object_store.PART_BYTES = 5 << 20
    keras.utils.set_random_seed(1)
    x = np.random.default_rng(0).normal(size=(64, 32)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.layers.Input((32,)),
                              keras.layers.Dense(700, activation="relu"),
                              keras.layers.Dense(700), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")

    class Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            print("batch", flush=True)

    model.fit(x, y, epochs=100, batch_size=8, verbose=0,
              callbacks=[fastbackup.BackupAndRestore({url!r}, save_freq=1,
                                                     delete_checkpoint=False),
                         Progress()])
""")


def test_kill_9_mid_upload_leaves_a_whole_committed_checkpoint(bucket):
    bucket_url = bucket.url
    env = worker_env()
    env["FASTBACKUP_LEASE_SECONDS"] = "1"
    store = open_store(bucket_url)
    mid_upload = 0
    before: set[str] = set()
    # At least 3 kills, and more (up to 6) until one has landed mid-upload:
    # an upload to a local server takes milliseconds, and on a loaded machine
    # 3 kills sometimes all land between two uploads (seen: 1 run in 3 with
    # both cores busy).
    for kill in range(6):
        if kill >= 3 and mid_upload:
            break
        proc = subprocess.Popen(
            [sys.executable, "-c", _TRAINER.format(repo=REPO, url=bucket_url)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            batches = 0
            deadline = time.monotonic() + SUBPROCESS_TIMEOUT
            while batches < 3 + kill and time.monotonic() < deadline:
                line = proc.stdout.readline()
                assert line, proc.stderr.read()[-3000:]
                batches += 1
            # Kill while a multipart upload is in flight, once a checkpoint
            # is committed. Uploads killed earlier stay listed (a lifecycle
            # rule removes them).
            while not store.list_checkpoints() and time.monotonic() < deadline:
                time.sleep(0.01)
            while (not set(bucket.multipart_uploads()) - before
                   and time.monotonic() < deadline):
                time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
        # Still listed after the kill: the kill landed mid-upload.
        left = set(bucket.multipart_uploads()) - before
        mid_upload += bool(left)
        before |= left
        committed = store.list_checkpoints()
        assert committed, "a checkpoint was committed before the kill"
        time.sleep(1.1)  # the killed job's lease expires
        model = keras_model_like_trainer()
        callback = fastbackup.BackupAndRestore(bucket_url, save_freq=1,
                                               delete_checkpoint=False)
        callback.set_model(model)
        callback.on_train_begin()
        assert callback.restored_from[0] == committed[0][0]
        # Uncommitted objects are gone; every committed one is whole. The
        # model config is the one object besides them, written once per fit.
        names = set(_names(store))
        assert {u.rsplit("/", 1)[1] for _, u in committed} | {
            "COMMITTED", "LEASE", MODEL_CONFIG_NAME} == names
        for _, url in store.list_checkpoints():
            with store.open_checkpoint(url) as reader:
                reader.verify()
        callback.store.release_lock(callback)
    assert mid_upload >= 1


def keras_model_like_trainer():
    import keras

    model = keras.Sequential([keras.layers.Input((32,)),
                              keras.layers.Dense(700, activation="relu"),
                              keras.layers.Dense(700), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def test_errno_of_a_failed_request_is_eio(bucket_fault_proxy, bucket_url, monkeypatch):
    store = object_store.ObjectStore(bucket_url, retry_seconds=0.5)
    bucket_fault_proxy.fail_all("503")
    with pytest.raises(OSError) as info:
        store.commit(0, _encoded(0), sync=True)
    assert info.value.errno == errno.EIO
    assert info.value.filename == f"{bucket_url}/ckpt-000000000000.fbk"


# CLI on URLs ------------------------------------------------------------------


def test_cli_inspect_verify_export_on_a_url(bucket_url, tmp_path, capsys):
    from fastbackup import cli

    x, y = make_data()
    model = make_model()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(bucket_url, double_checkpoint=True,
                                    delete_checkpoint=False)])
    store = open_store(bucket_url)
    (newest, newest_url), (older, _) = store.list_checkpoints()
    obstore.put(store.client, store._key("ckpt-000000000009.fbk"), b"torn")

    assert cli.main(["inspect", bucket_url]) == 0
    out = capsys.readouterr().out
    assert f"backup directory {bucket_url}: 2 checkpoint(s)" in out
    assert out.index(newest_url.rsplit("/", 1)[1]) < out.index(
        f"ckpt-{older:012d}.fbk")
    assert "ok (every checksum verified)" in out
    assert "leftover temporary file ckpt-000000000009.fbk" in out

    assert cli.main(["verify", "--json", bucket_url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["newest_valid"] == newest_url
    assert report["temp_files"] == [f"{bucket_url}/ckpt-000000000009.fbk"]

    untrained = make_model()
    model_file = tmp_path / "model.keras"
    untrained.save(model_file)
    out_file = tmp_path / "out.weights.h5"
    assert cli.main(["export", bucket_url, str(out_file), "--model",
                     str(model_file)]) == 0
    assert f"exported ckpt-{newest:012d}.fbk" in capsys.readouterr().out
    untrained.load_weights(out_file)
    with store.open_checkpoint(newest_url) as reader:
        kernel = np.empty(reader.entries[0].shape, reader.entries[0].np_dtype)
        reader.read_tensor(reader.entries[0], kernel)
    assert np.array(untrained.layers[0].kernel.numpy()).tobytes() == kernel.tobytes()
    # Without a model: rebuilt from the config the callback stored in the
    # bucket, once per fit.
    bare_file = tmp_path / "bare.weights.h5"
    assert cli.main(["export", bucket_url, str(bare_file)]) == 0
    assert f"exported ckpt-{newest:012d}.fbk" in capsys.readouterr().out
    fresh = make_model()
    fresh.load_weights(bare_file)
    assert np.array(fresh.layers[0].kernel.numpy()).tobytes() == kernel.tobytes()
    assert cli.main(["inspect", "--no-verify", bucket_url]) == 0
    assert "model config: Sequential" in capsys.readouterr().out

    # Damage: verify reports it and exits 1. Nothing was modified by the CLI.
    key = store._key(newest_url.rsplit("/", 1)[1])
    data = bytearray(obstore.get(store.client, key).bytes())
    data[40] ^= 0x10
    obstore.put(store.client, key, bytes(data))
    assert cli.main(["verify", bucket_url]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "1 ok, 1 damaged" in out
    assert "ckpt-000000000009.fbk" in _names(store)


def test_cli_refuses_unsupported_and_empty_urls(bucket_url, capsys):
    from fastbackup import cli

    assert cli.main(["inspect", "ftp://host/x"]) == 2
    assert "Unsupported URL scheme 'ftp'" in capsys.readouterr().err
    assert cli.main(["verify", bucket_url]) == 2
    assert "no fastbackup backup there" in capsys.readouterr().err


# Prefixes and deletes ------------------------------------------------------------


def test_remove_all_empties_only_its_own_prefix(bucket_url):
    """What `delete_checkpoint` does at the end of a successful fit."""
    store = open_store(bucket_url)
    store.commit(0, _encoded(0), sync=True)
    # A sibling prefix that starts with the same characters.
    other = open_store(f"{bucket_url}-2")
    other.commit(0, _encoded(0), sync=True)
    assert store.exists()
    store.remove_all()
    assert not store.exists() and _names(store) == []
    assert store.list_checkpoints() == []
    assert _names(other) == ["COMMITTED", "ckpt-000000000000.fbk"]


def test_deleting_a_batch_with_a_missing_object_deletes_the_others(bucket_url):
    # GCS answers a DELETE of a missing object with 404 (S3 with 204), and
    # the client gives up a batch at its first error: a part already gone
    # (removed by another clean-up, or a retried DELETE) must not leave the
    # others behind.
    store = open_store(bucket_url)
    names = [part_name(3, i, 3) for i in range(3)]
    for name in names[1:]:
        obstore.put(store.client, store._key(name), b"part")
    assert store.list_parts() == names[1:]
    store.remove_parts(names)
    assert store.list_parts() == [] and not store.exists()


def test_fit_whose_backup_cannot_be_written_fails_at_its_start(bucket):
    """A backup_dir in a bucket that does not exist stops `fit` before its
    first batch, naming the lease: never a training that believes it is
    backed up."""
    url = f"{bucket.scheme}://fb-missing-{os.getpid()}/runs/job-1"
    x, y = make_data()
    model = make_model()
    before = [np.array(w.numpy(), copy=True) for w in model.weights]
    callback = fastbackup.BackupAndRestore(url, save_freq=2)
    with pytest.raises(OSError) as info:
        model.fit(x, y, epochs=1, batch_size=8, verbose=0,
                  callbacks=[callback])
    assert info.value.filename == f"{url}/LEASE"
    # No step ran (some backends build the optimizer before the callbacks
    # start: only the model's own weights are compared).
    assert_state_equal([np.array(w.numpy()) for w in model.weights], before)
    assert int(np.array(model.optimizer.iterations.numpy())) == 0
