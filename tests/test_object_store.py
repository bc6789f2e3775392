"""Backups in an object store: `fastbackup.stores.object_store` against a real S3
server (moto, its own process on 127.0.0.1), end to end with Keras models,
under faults injected by a proxy, and across `kill -9`."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
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
from fastbackup.stores import locks, object_store
from fastbackup.stores.base import WriteCancelled
from fastbackup.stores.local import LocalStore
from fastbackup.stores.location import open_store
from fastbackup.stores.names import MODEL_CONFIG_NAME, part_name
from tests.conftest import (
    TENSOR_BYTE,
    InterruptAt,
    all_state,
    assert_state_equal,
    fresh_model,
    make_data,
    make_model,
    worker_env,
)
from tests.object_servers import list_multipart_uploads

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


def test_open_store_picks_one_store_per_kind(tmp_path, s3_url):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    local = open_store(f"file://{tmp_path}")
    assert isinstance(local, LocalStore)
    assert local.directory == str(tmp_path)
    s3 = open_store(s3_url + "/")
    assert isinstance(s3, object_store.ObjectStore)
    assert s3.location == s3_url
    assert open_store(s3) is s3


@pytest.mark.parametrize("name", ["FASTBACKUP_LEASE_SECONDS",
                                  "FASTBACKUP_RETRY_SECONDS"])
@pytest.mark.parametrize("raw", ["0", "-1", "abc", "nan", "1e9"])
def test_seconds_variables_are_validated(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(fastbackup.ConfigError, match=name):
        fastbackup.BackupAndRestore("s3://bucket/prefix")


# Store operations ---------------------------------------------------------------


def test_commit_is_the_same_file_as_on_disk(tmp_path, s3_url, monkeypatch):
    # Larger than a part: a multipart upload with parts in flight together.
    monkeypatch.setattr(object_store, "PART_BYTES", 5 << 20)
    encoded = _encoded(3, n=3 << 20)  # 12 MiB + 24 MiB
    store = open_store(s3_url)
    result = store.commit(3, encoded, sync=True)
    assert result.path == f"{s3_url}/ckpt-000000000003.fbk"
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
    assert list_multipart_uploads(os.environ["AWS_ENDPOINT_URL"],
                                  store.bucket) == []


def test_small_commit_and_prune_keep_the_record_first(s3_url):
    store = open_store(s3_url)
    assert store.list_checkpoints() == [] and not store.exists()
    for step in range(3):
        store.commit(step, _encoded(step), sync=True)
    assert [s for s, _ in store.list_checkpoints()] == [2, 1, 0]
    store.prune(keep=2)
    assert [s for s, _ in store.list_checkpoints()] == [2, 1]
    assert _names(store) == ["COMMITTED", "ckpt-000000000001.fbk",
                             "ckpt-000000000002.fbk"]


def test_uncommitted_objects_are_removed_committed_kept(s3_url):
    store = open_store(s3_url)
    store.commit(0, _encoded(0), sync=True)
    # A writer killed between its data object and the commit record.
    obstore.put(store.client, store._key("ckpt-000000000001.fbk"), b"partial")
    obstore.put(store.client, store._key("notes.txt"), b"not ours to remove")
    assert [s for s, _ in store.list_checkpoints()] == [0]
    removed = store.remove_temp_files()
    assert removed == [f"{s3_url}/ckpt-000000000001.fbk"]
    assert _names(store) == ["COMMITTED", "ckpt-000000000000.fbk", "notes.txt"]


def test_cancelled_upload_leaves_nothing(s3_url, monkeypatch):
    monkeypatch.setattr(object_store, "PART_BYTES", 5 << 20)
    store = open_store(s3_url)
    store.commit(0, _encoded(0), sync=True)
    encoded = _encoded(1, n=3 << 20)
    cancel = threading.Event()
    # Cancelled after the first segment went out: mid multipart upload.
    real = encoded.segments
    encoded.segments = [real[0], real[1], _SetOnLen(real[2], cancel)]
    with pytest.raises(WriteCancelled):
        store.commit(1, encoded, sync=True, cancel=cancel)
    assert _names(store) == ["COMMITTED", "ckpt-000000000000.fbk"]
    assert list_multipart_uploads(os.environ["AWS_ENDPOINT_URL"],
                                  store.bucket) == []


class _SetOnLen(bytes):
    """A segment that sets `event` when the writer measures it."""

    def __new__(cls, data, event):
        obj = super().__new__(cls, bytes(data))
        obj.event = event
        return obj

    def __len__(self):
        self.event.set()
        return super().__len__()


def test_small_objects_roundtrip_and_go_with_the_backup(s3_url, tmp_path):
    for store in (open_store(s3_url),
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


def test_damaged_commit_record_is_an_error_naming_it(s3_url):
    store = open_store(s3_url)
    obstore.put(store.client, store._key("COMMITTED"), b"{not json")
    with pytest.raises(OSError, match="commit record is damaged") as info:
        store.list_checkpoints()
    assert info.value.filename == f"{s3_url}/COMMITTED"


# Lease lock ---------------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from fastbackup.stores.local import LocalStore
    from fastbackup.stores.names import MODEL_CONFIG_NAME, part_name
    from fastbackup.stores.location import open_store
    from fastbackup.stores.base import WriteCancelled
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


def test_second_job_is_refused_while_the_first_renews(s3_url):
    # Lifetimes of 3 s (renewed every 0.75 s) leave a loaded machine's
    # scheduling delays far from the expiry.
    holder = _start_holder(s3_url, lease=3.0)
    try:
        owner = _Owner()
        # Checked over more than a lifetime: the holder kept renewing.
        for _ in range(3):
            store = open_store(s3_url, lease_seconds=3.0)
            with pytest.raises(BackupDirLockedError, match="locked by another job"):
                store.acquire_lock(owner, owner.flush)
            time.sleep(1.6)
    finally:
        holder.kill()
        holder.wait(timeout=SUBPROCESS_TIMEOUT)


def test_killed_jobs_lease_is_taken_over_after_expiry(s3_url, caplog):
    holder = _start_holder(s3_url, lease=3.0)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=SUBPROCESS_TIMEOUT)
    killed_at = time.monotonic()
    store = open_store(s3_url, lease_seconds=3.0)
    owner = _Owner()
    with pytest.raises(BackupDirLockedError, match="lease valid"):
        store.acquire_lock(owner, owner.flush)
    # The lease was last renewed before the kill: it has expired 3 s later.
    time.sleep(max(0.0, killed_at + 3.1 - time.monotonic()))
    with caplog.at_level(logging.WARNING, logger="fastbackup"):
        store.acquire_lock(owner, owner.flush)
    assert "took over the expired lease" in caplog.text
    try:
        lease = json.loads(bytes(obstore.get(
            store.client, store._key("LEASE")).bytes()))
        assert lease["pid"] == os.getpid()
    finally:
        store.release_lock(owner)
    assert "LEASE" not in _names(store)


def test_lease_taken_over_behind_our_back_stops_commits(s3_url):
    store = open_store(s3_url, lease_seconds=0.8)
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


def test_same_process_rules_match_the_local_lock(s3_url):
    store = open_store(s3_url, lease_seconds=5)
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


# End to end ---------------------------------------------------------------------


def test_interrupted_fit_resumes_from_the_bucket_and_empties_it(
    s3_url, monkeypatch
):
    monkeypatch.setenv("FASTBACKUP_ON_BUSY", "wait")
    x, y = make_data()
    model = make_model()
    callback = fastbackup.BackupAndRestore(s3_url, save_freq=3)
    # 8 batches per epoch: the 21st batch (epoch 2, batch 4) saves, then
    # the job dies.
    with pytest.raises(RuntimeError, match="Interrupting"):
        model.fit(x, y, epochs=4, batch_size=4, verbose=0,
                  callbacks=[callback, InterruptAt(2, 4)])
    callback.wait_until_finished()
    saved = all_state(model, metrics=False)
    store = open_store(s3_url)
    [(step, url)] = store.list_checkpoints()
    assert url.startswith(s3_url + "/")
    store.release_lock(callback)

    # A new process's fit (fresh model, fresh callback) resumes.
    resumed = fresh_model()
    again = fastbackup.BackupAndRestore(s3_url, save_freq=3)
    again.set_model(resumed)
    again.on_train_begin()
    assert again.restored_from[0] == step
    assert again.restored_from[1:] == (2, 4)
    assert_state_equal(all_state(resumed, metrics=False), saved)
    again.store.release_lock(again)

    history = fresh_model().fit(
        x, y, epochs=4, batch_size=4, verbose=0,
        callbacks=[fastbackup.BackupAndRestore(s3_url, save_freq=3)],
    )
    assert len(history.history["loss"]) == 2  # epochs 2 and 3
    # A successful fit empties the prefix, lease included.
    assert not store.exists()


def test_double_checkpoint_falls_back_when_the_newest_is_damaged(s3_url):
    x, y = make_data()
    model = make_model()
    callback = fastbackup.BackupAndRestore(s3_url, save_freq=2,
                                           double_checkpoint=True,
                                           delete_checkpoint=False)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0, callbacks=[callback])
    store = open_store(s3_url)
    (newest, newest_url), (previous, _) = store.list_checkpoints()
    key = store._key(newest_url.rsplit("/", 1)[1])
    data = bytearray(obstore.get(store.client, key).bytes())
    data[20] ^= 0x10
    obstore.put(store.client, key, bytes(data))
    again = fastbackup.BackupAndRestore(s3_url, save_freq=2,
                                        double_checkpoint=True)
    again.set_model(fresh_model())
    again.on_train_begin()
    assert again.restored_from[0] == previous
    again.store.release_lock(again)


# Faults ---------------------------------------------------------------------


def test_retries_ride_out_503_and_dropped_connections(fault_proxy, s3_url,
                                                      monkeypatch):
    monkeypatch.setattr(object_store, "PART_BYTES", 5 << 20)
    store = open_store(s3_url)
    fault_proxy.inject("503", "drop", "503", "drop")
    store.commit(0, _encoded(0, n=2 << 20), sync=True)  # multipart
    fault_proxy.inject("drop", "503")
    [(step, url)] = store.list_checkpoints()
    fault_proxy.inject("503", "drop")
    with store.open_checkpoint(url) as reader:
        reader.verify()
    assert fault_proxy.injected == {"503": 4, "drop": 4}


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_failed_upload_is_a_write_error_and_the_previous_checkpoint_stays(
    fault_proxy, s3_url, monkeypatch, fault
):
    monkeypatch.setenv("FASTBACKUP_RETRY_SECONDS", "1")
    x, y = make_data()
    model = make_model()
    callback = fastbackup.BackupAndRestore(s3_url, save_freq=2,
                                           delete_checkpoint=False)
    failing = _FailFrom(fault_proxy, fault, batch=3, backup=callback)
    with pytest.raises(BackupWriteError, match="background checkpoint write"):
        model.fit(x, y, epochs=3, batch_size=4, verbose=0,
                  callbacks=[failing, callback])
    fault_proxy.fail_all(None)
    callback.wait_until_finished(raise_errors=False)
    store = open_store(s3_url)
    [(step, _)] = store.list_checkpoints()
    store.release_lock(callback)
    again = fastbackup.BackupAndRestore(s3_url, save_freq=2)
    again.set_model(fresh_model())
    again.on_train_begin()
    assert again.restored_from == (step, 0, 1)
    again.store.release_lock(again)


def test_on_error_warn_keeps_training_through_a_failed_upload(
    fault_proxy, s3_url, monkeypatch, caplog
):
    monkeypatch.setenv("FASTBACKUP_RETRY_SECONDS", "1")
    monkeypatch.setenv("FASTBACKUP_ON_ERROR", "warn")
    monkeypatch.setenv("FASTBACKUP_ON_BUSY", "wait")
    x, y = make_data()
    callback = fastbackup.BackupAndRestore(s3_url, save_freq=2)
    failing = _FailFrom(fault_proxy, "503", batch=3, backup=callback, until=5)
    with caplog.at_level(logging.WARNING, logger="fastbackup"):
        history = make_model().fit(x, y, epochs=2, batch_size=4, verbose=0,
                                   callbacks=[failing, callback])
    assert len(history.history["loss"]) == 2
    assert "a checkpoint write failed" in caplog.text
    assert not open_store(s3_url).exists()


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


def test_kill_9_mid_upload_leaves_a_whole_committed_checkpoint(s3_url):
    env = worker_env()
    env["FASTBACKUP_LEASE_SECONDS"] = "1"
    store = open_store(s3_url)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
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
            [sys.executable, "-c", _TRAINER.format(repo=REPO, url=s3_url)],
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
            while (not set(list_multipart_uploads(endpoint, store.bucket)) - before
                   and time.monotonic() < deadline):
                time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
        # Still listed after the kill: the kill landed mid-upload.
        left = set(list_multipart_uploads(endpoint, store.bucket)) - before
        mid_upload += bool(left)
        before |= left
        committed = store.list_checkpoints()
        assert committed, "a checkpoint was committed before the kill"
        time.sleep(1.1)  # the killed job's lease expires
        model = keras_model_like_trainer()
        callback = fastbackup.BackupAndRestore(s3_url, save_freq=1,
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


def test_errno_of_a_failed_request_is_eio(fault_proxy, s3_url, monkeypatch):
    store = object_store.ObjectStore(s3_url, retry_seconds=0.5)
    fault_proxy.fail_all("503")
    with pytest.raises(OSError) as info:
        store.commit(0, _encoded(0), sync=True)
    assert info.value.errno == errno.EIO
    assert info.value.filename == f"{s3_url}/ckpt-000000000000.fbk"


# CLI on URLs ------------------------------------------------------------------


def test_cli_inspect_verify_export_on_a_url(s3_url, tmp_path, capsys):
    from fastbackup import cli

    x, y = make_data()
    model = make_model()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(s3_url, double_checkpoint=True,
                                    delete_checkpoint=False)])
    store = open_store(s3_url)
    (newest, newest_url), (older, _) = store.list_checkpoints()
    obstore.put(store.client, store._key("ckpt-000000000009.fbk"), b"torn")

    assert cli.main(["inspect", s3_url]) == 0
    out = capsys.readouterr().out
    assert f"backup directory {s3_url}: 2 checkpoint(s)" in out
    assert out.index(newest_url.rsplit("/", 1)[1]) < out.index(
        f"ckpt-{older:012d}.fbk")
    assert "ok (every checksum verified)" in out
    assert "leftover temporary file ckpt-000000000009.fbk" in out

    assert cli.main(["verify", "--json", s3_url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["newest_valid"] == newest_url
    assert report["temp_files"] == [f"{s3_url}/ckpt-000000000009.fbk"]

    untrained = make_model()
    model_file = tmp_path / "model.keras"
    untrained.save(model_file)
    out_file = tmp_path / "out.weights.h5"
    assert cli.main(["export", s3_url, str(out_file), "--model",
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
    assert cli.main(["export", s3_url, str(bare_file)]) == 0
    assert f"exported ckpt-{newest:012d}.fbk" in capsys.readouterr().out
    fresh = make_model()
    fresh.load_weights(bare_file)
    assert np.array(fresh.layers[0].kernel.numpy()).tobytes() == kernel.tobytes()
    assert cli.main(["inspect", "--no-verify", s3_url]) == 0
    assert "model config: Sequential" in capsys.readouterr().out

    # Damage: verify reports it and exits 1. Nothing was modified by the CLI.
    key = store._key(newest_url.rsplit("/", 1)[1])
    data = bytearray(obstore.get(store.client, key).bytes())
    data[40] ^= 0x10
    obstore.put(store.client, key, bytes(data))
    assert cli.main(["verify", s3_url]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "1 ok, 1 damaged" in out
    assert "ckpt-000000000009.fbk" in _names(store)


def test_cli_refuses_unsupported_and_empty_urls(s3_url, capsys):
    from fastbackup import cli

    assert cli.main(["inspect", "ftp://host/x"]) == 2
    assert "Unsupported URL scheme 'ftp'" in capsys.readouterr().err
    assert cli.main(["verify", s3_url]) == 2
    assert "no fastbackup backup there" in capsys.readouterr().err


# GCS ------------------------------------------------------------------------
#
# Against fake-gcs-server, a real GCS emulator process. No emulator that
# installs from PyPI accepts the writes of obstore's GCS client (XML API PUT,
# XML multipart upload, `x-goog-if-generation-match`): measured in
# docs/remote-storage.md, Limits. So the objects a writer leaves are put
# through the emulator's JSON API, and everything fastbackup does to a gs://
# backup short of writing is run for real: the commit record, listing,
# ranged reads, restore and its fallback, the CLI, and the deletes that
# clean up and empty the prefix.


def _gcs_upload_backup(gcs_server, url, local, damage_newest=False):
    """Puts a local backup's checkpoints, model config and commit record
    under `url`, as the writer leaves them; returns the record's entries."""
    _, bucket, prefix = object_store.parse_url(url)
    entries = []
    for i, (step, path) in enumerate(LocalStore(str(local)).list_checkpoints()):
        name = os.path.basename(path)
        with open(path, "rb") as f:
            data = bytearray(f.read())
        if damage_newest and i == 0:
            data[TENSOR_BYTE] ^= 0x10
        gcs_server.upload(bucket, f"{prefix}/{name}", bytes(data))
        entries.append({"step": step, "name": name, "size": len(data)})
    config = os.path.join(local, MODEL_CONFIG_NAME)
    with open(config, "rb") as f:
        gcs_server.upload(bucket, f"{prefix}/{MODEL_CONFIG_NAME}",
                          f.read())
    gcs_server.upload(bucket, f"{prefix}/COMMITTED",
                      object_store.record_bytes(entries))
    return entries


def _local_backup(tmp_path):
    local = tmp_path / "local"
    x, y = make_data()
    make_model().fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(local, double_checkpoint=True,
                                    delete_checkpoint=False)])
    return local


def _built_fresh_model():
    model = fresh_model()
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    return model


def test_gcs_backup_is_read_restored_and_verified_through_the_emulator(
    gcs_server, gcs_url, tmp_path, capsys
):
    """A gs:// backup on a real GCS emulator: listing, ranged reads, restore
    and the CLI."""
    from fastbackup import cli, restore

    local = _local_backup(tmp_path)
    entries = _gcs_upload_backup(gcs_server, gcs_url, local)
    url = gcs_url

    store = open_store(url)
    assert isinstance(store, object_store.ObjectStore)
    assert store.list_checkpoints() == [
        (e["step"], f"{url}/{e['name']}") for e in entries]
    assert store.list_temp_files() == []

    from_gcs, from_disk = _built_fresh_model(), _built_fresh_model()
    reader = restore.restore_latest(store, from_gcs, fall_back=False)
    assert reader.step == entries[0]["step"] and reader.path.startswith(url)
    restore.restore_latest(str(local), from_disk, fall_back=False)
    assert_state_equal(all_state(from_gcs), all_state(from_disk))

    assert cli.main(["verify", url]) == 0
    out = capsys.readouterr().out
    assert "2 checkpoint(s): 2 ok, 0 damaged" in out


def test_gcs_double_checkpoint_falls_back_when_the_newest_is_damaged(
    gcs_server, gcs_url, tmp_path, capsys
):
    from fastbackup import cli, restore
    from fastbackup.errors import CheckpointCorruptError

    local = _local_backup(tmp_path)
    (newest, _), (previous, previous_path) = LocalStore(str(local)).list_checkpoints()
    _gcs_upload_backup(gcs_server, gcs_url, local, damage_newest=True)
    store = open_store(gcs_url)

    with pytest.raises(CheckpointCorruptError):
        restore.restore_latest(store, _built_fresh_model(), fall_back=False)
    from_gcs, from_disk = _built_fresh_model(), _built_fresh_model()
    reader = restore.restore_latest(store, from_gcs, fall_back=True)
    assert reader.step == previous
    only_previous = tmp_path / "previous"
    only_previous.mkdir()
    shutil.copy(previous_path, only_previous)
    restore.restore_latest(str(only_previous), from_disk, fall_back=False)
    assert_state_equal(all_state(from_gcs), all_state(from_disk))

    assert cli.main(["verify", gcs_url]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "1 ok, 1 damaged" in out
    assert newest > previous


def test_gcs_cleanup_removes_uncommitted_objects_and_keeps_the_rest(
    gcs_server, gcs_url, tmp_path, capsys
):
    from fastbackup import cli

    local = _local_backup(tmp_path)
    entries = _gcs_upload_backup(gcs_server, gcs_url, local)
    _, bucket, prefix = object_store.parse_url(gcs_url)
    # A writer killed between its data object and the commit record, and an
    # object that is not fastbackup's.
    gcs_server.upload(bucket, f"{prefix}/ckpt-000000000099.fbk", b"torn")
    gcs_server.upload(bucket, f"{prefix}/notes.txt", b"not ours to remove")
    store = open_store(gcs_url)

    assert cli.main(["inspect", gcs_url]) == 0
    out = capsys.readouterr().out
    assert f"backup directory {gcs_url}: 2 checkpoint(s)" in out
    assert "leftover temporary file ckpt-000000000099.fbk" in out
    assert cli.main(["verify", "--json", gcs_url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["temp_files"] == [
        f"{gcs_url}/ckpt-000000000099.fbk"]
    # The CLI modified nothing.
    assert "ckpt-000000000099.fbk" in _names(store)

    assert store.remove_temp_files() == [f"{gcs_url}/ckpt-000000000099.fbk"]
    assert _names(store) == sorted(
        ["COMMITTED", MODEL_CONFIG_NAME, "notes.txt"]
        + [e["name"] for e in entries])
    assert [s for s, _ in store.list_checkpoints()] == [
        e["step"] for e in entries]


def test_gcs_remove_all_empties_only_its_own_prefix(gcs_server, gcs_url,
                                                    tmp_path):
    """What `delete_checkpoint` does at the end of a successful fit."""
    local = _local_backup(tmp_path)
    _gcs_upload_backup(gcs_server, gcs_url, local)
    _, bucket, prefix = object_store.parse_url(gcs_url)
    # A sibling prefix that starts with the same characters.
    other = open_store(f"gs://{bucket}/{prefix}-2")
    gcs_server.upload(bucket, f"{prefix}-2/COMMITTED",
                      object_store.record_bytes([]))
    store = open_store(gcs_url)
    assert store.exists()
    store.remove_all()
    assert not store.exists() and _names(store) == []
    assert store.list_checkpoints() == []
    assert _names(other) == ["COMMITTED"]


def test_gcs_deleting_a_batch_with_a_missing_object_deletes_the_others(
    gcs_server, gcs_url
):
    # GCS answers a DELETE of a missing object with 404 (S3 with 204), and
    # the client gives up a batch at its first error: a part already gone
    # (removed by another clean-up, or a retried DELETE) must not leave the
    # others behind.
    _, bucket, prefix = object_store.parse_url(gcs_url)
    names = [part_name(3, i, 3) for i in range(3)]
    for name in names[1:]:
        gcs_server.upload(bucket, f"{prefix}/{name}", b"part")
    store = open_store(gcs_url)
    assert store.list_parts() == names[1:]
    store.remove_parts(names)
    assert store.list_parts() == [] and not store.exists()


def test_gcs_write_the_emulator_refuses_is_an_error_naming_the_object(
    gcs_server, gcs_url, tmp_path
):
    """The emulator refuses XML-API uploads (`400 invalid uploadType`): a
    refused write fails at once (a 4xx is not retried) as EIO naming the
    object, and the committed checkpoints stay readable. If this test fails
    because the upload succeeded, the emulator now takes GCS writes: test
    the write path, the lease and `fit` end to end on it."""
    local = _local_backup(tmp_path)
    entries = _gcs_upload_backup(gcs_server, gcs_url, local)
    store = open_store(gcs_url)
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        store.commit(50, _encoded(50), sync=True)
    assert time.monotonic() - start < 30
    assert info.value.errno == errno.EIO
    assert info.value.filename == f"{gcs_url}/ckpt-000000000050.fbk"
    assert "400" in str(info.value)
    assert [s for s, _ in store.list_checkpoints()] == [
        e["step"] for e in entries]
    owner = _Owner()
    with pytest.raises(OSError) as info:
        store.acquire_lock(owner, owner.flush)
    assert info.value.filename == f"{gcs_url}/LEASE"


def test_gcs_reads_ride_out_503_and_dropped_connections(
    gcs_server, gcs_url, gcs_fault_proxy, tmp_path
):
    """The GCS client gets the same retry policy as the S3 one."""
    from fastbackup import restore

    local = _local_backup(tmp_path)
    entries = _gcs_upload_backup(gcs_server, gcs_url, local)
    store = open_store(gcs_url)
    gcs_fault_proxy.inject("503", "drop", "503", "drop")
    assert [s for s, _ in store.list_checkpoints()] == [
        e["step"] for e in entries]
    gcs_fault_proxy.inject("drop", "503")
    # A new store: a new client, whose first connection meets the faults
    # (the emulator keeps connections alive, so one fault hits one
    # connection, not one request).
    model = _built_fresh_model()
    reader = restore.restore_latest(open_store(gcs_url), model,
                                    fall_back=False)
    assert reader.step == entries[0]["step"]
    assert gcs_fault_proxy.injected == {"503": 3, "drop": 3}

    failing = object_store.ObjectStore(gcs_url, retry_seconds=0.5)
    gcs_fault_proxy.fail_all("503")
    with pytest.raises(OSError) as info:
        failing.list_checkpoints()
    assert info.value.errno == errno.EIO
    assert info.value.filename == f"{gcs_url}/COMMITTED"


def test_gcs_fit_whose_backup_cannot_be_written_fails_at_its_start(
    gcs_url, tmp_path
):
    """A gs:// backup_dir that refuses writes stops `fit` before its first
    batch, naming the lease: never a training that believes it is backed
    up."""
    x, y = make_data()
    model = make_model()
    before = [np.array(w.numpy(), copy=True) for w in model.weights]
    callback = fastbackup.BackupAndRestore(gcs_url, save_freq=2)
    with pytest.raises(OSError) as info:
        model.fit(x, y, epochs=1, batch_size=8, verbose=0,
                  callbacks=[callback])
    assert info.value.filename == f"{gcs_url}/LEASE"
    # No step ran (some backends build the optimizer before the callbacks
    # start: only the model's own weights are compared).
    assert_state_equal([np.array(w.numpy()) for w in model.weights], before)
    assert int(np.array(model.optimizer.iterations.numpy())) == 0
    assert open_store(gcs_url).list_checkpoints() == []
