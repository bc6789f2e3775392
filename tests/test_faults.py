"""Faults on the write path: each one reaches the training thread, and none
costs the previous checkpoint.

Every case trains one epoch (checkpoint A, step 0, epoch 1), then makes the
next save fail and checks: by default `BackupWriteError` (an `OSError`
naming the file) is raised on the training thread; with
`FASTBACKUP_ON_ERROR=warn` it is a warning and training goes on; A is still
there and restores bitwise; no temporary file is left; the failed save's
checkpoint does not exist (an fsync failure is never taken for success).

Real faults use a 1 MiB tmpfs (ENOSPC) and a read-only bind mount; they need
root and mount(8), and are skipped with the reason otherwise. The others use
the native extension's test-only failpoints.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess

import keras
import numpy as np
import pytest

import fastbackup
from fastbackup._compat import native
from fastbackup.format import CheckpointReader
from fastbackup.snapshot import collect_variables
from fastbackup.stores import locks
from fastbackup.stores.local import LOCK_NAME, LocalStore
from fastbackup.stores.names import MODEL_CONFIG_NAME
from tests.conftest import (
    all_state,
    assert_state_equal,
    fresh_model,
    make_data,
    make_model,
)


@pytest.fixture(autouse=True)
def _no_failpoints():
    native.clear_failpoints()
    yield
    native.clear_failpoints()


def _temp_files(directory) -> list[str]:
    try:
        return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))
    except FileNotFoundError:
        return []


def _model():
    # Eager: these tests run a few tiny steps, and tracing a train function
    # would cost more than all of them.
    model = make_model()
    model.compile(optimizer="adam", loss="mse", metrics=["mae"],
                  run_eagerly=True)
    return model


def _first_epoch(backup, **kwargs):
    """Trains epoch 0; returns (model, data, callback, state A).

    State A maps each variable's checkpoint name to its value at the end of
    epoch 0, which checkpoint A (step 0, epoch 1) must hold bitwise.
    """
    x, y = make_data(n=16)
    model = _model()
    cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False, **kwargs)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    assert [s for s, _ in LocalStore(str(backup)).list_checkpoints()] == [0]
    names = [name for name, _ in collect_variables(model)]
    return model, (x, y), cb, dict(zip(names, all_state(model)))


def _assert_checkpoint_a_intact(backup, state_a, steps=(0,)):
    """A (step 0, epoch 1) is present, verifies, and holds state A bitwise."""
    ckpts = LocalStore(str(backup)).list_checkpoints()
    assert [s for s, _ in ckpts] == list(steps)
    with CheckpointReader(dict(ckpts)[0]) as reader:
        reader.verify()
        assert (reader.step, reader.epoch, reader.batch) == (0, 1, 0)
        assert sorted(e.name for e in reader.entries) == sorted(state_a)
        for entry in reader.entries:
            out = np.empty(entry.shape, entry.np_dtype)
            reader.read_tensor(entry, out)
            want = state_a[entry.name]
            assert out.dtype == want.dtype and out.shape == want.shape
            assert out.tobytes() == want.tobytes(), entry.name
    assert _temp_files(backup) == []


def _release(backup):
    # A fit that raised never reached on_train_end: drop its lock so that a
    # mount can be unmounted.
    held = locks.held(os.path.realpath(str(backup)))
    if held is not None and held.owner() is not None:
        LocalStore(str(backup)).release_lock(held.owner())


class _AtEpochBegin(keras.callbacks.Callback):
    def __init__(self, epoch, action):
        super().__init__()
        self.epoch = epoch
        self.action = action

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.action()


class _Inspect(keras.callbacks.Callback):
    """Runs `check` at the start of `epoch`, once the failed save is over."""

    def __init__(self, cb, epoch, check):
        super().__init__()
        self.cb = cb
        self.epoch = epoch
        self.check = check
        self.ran = False

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            # The error stays stored for the callback to report.
            self.cb.wait_until_finished(raise_errors=False)
            self.check()
            self.ran = True


# Failpoint faults -------------------------------------------------------------

# (name, failpoints, errno expected, where the error names)
FAILPOINT_CASES = [
    ("fsync_eio", [("fsync", 1, errno.EIO)], errno.EIO, "temp"),
    ("write_enospc", [("write", 2, errno.ENOSPC)], errno.ENOSPC, "temp"),
    ("short_then_enospc", [("short_write", 100, 0), ("write", 5, errno.ENOSPC)],
     errno.ENOSPC, "temp"),
    ("open_eacces", [("open", 1, errno.EACCES)], errno.EACCES, "temp"),
    ("close_eio", [("close", 1, errno.EIO)], errno.EIO, "temp"),
    ("rename_exdev", [("rename", 1, errno.EXDEV)], errno.EXDEV, "temp"),
    ("rename_eio", [("rename", 1, errno.EIO)], errno.EIO, "temp"),
]


def _arm(failpoints):
    for op, nth, err in failpoints:
        native.set_failpoint(op, nth, err)


class _ArmAtTrainBegin(keras.callbacks.Callback):
    """Arms failpoints once fastbackup's `on_train_begin` is over.

    Listed after the fastbackup callback, so that the n-th operation counted
    is one of a checkpoint write, not of the model config file that
    `on_train_begin` writes.
    """

    def __init__(self, failpoints):
        super().__init__()
        self.failpoints = failpoints

    def on_train_begin(self, logs=None):
        _arm(self.failpoints)


@pytest.mark.parametrize("direct_io", ["on", "off"])
@pytest.mark.parametrize(
    "failpoints,expected_errno",
    [(fp, e) for _, fp, e, _ in FAILPOINT_CASES],
    ids=[c[0] for c in FAILPOINT_CASES],
)
def test_failed_write_raises_and_keeps_previous_checkpoint(
    tmp_path, monkeypatch, failpoints, expected_errno, direct_io
):
    backup = tmp_path / "backup"
    model, (x, y), first, state_a = _first_epoch(backup)
    if direct_io == "on" and failpoints == [("write", 2, errno.ENOSPC)]:
        # With O_DIRECT this small checkpoint is staged in the bounce
        # buffer and reaches the disk in a single write(2) at commit.
        failpoints = [("write", 1, errno.ENOSPC)]
    monkeypatch.setenv("FASTBACKUP_DIRECT_IO", direct_io)
    cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False)
    # The failing save (end of epoch 1) is the last one: a later save
    # could succeed and replace A before the error reaches `fit`.
    with pytest.raises(fastbackup.BackupWriteError) as info:
        model.fit(x, y, epochs=2, batch_size=8, verbose=0,
                  callbacks=[cb, _ArmAtTrainBegin(failpoints)])
    native.clear_failpoints()
    error = info.value
    assert isinstance(error, OSError)
    assert error.errno == expected_errno
    # (Keras's traceback filtering re-raises `from None`, so the chained
    # cause does not survive `fit`; errno, file and message do.)
    # The message names the file that failed, in the backup directory.
    assert error.filename and str(backup) in error.filename
    assert os.path.basename(error.filename).startswith(".ckpt-000000000001.fbk")
    assert os.strerror(expected_errno) in str(error)
    if failpoints[0][0] == "rename":
        # Both names: the temp file and the final name it was renamed to.
        final = os.path.join(str(backup), "ckpt-000000000001.fbk")
        assert f"'{final}'" in str(error)
    # The failed save (step 1) left nothing; A is intact.
    assert cb.stats.saves == 0 and cb.stats.last_durable is None
    _assert_checkpoint_a_intact(backup, state_a)


def test_fsync_failure_is_never_followed_by_trusting_the_data(tmp_path, caplog):
    # With warn, training goes on after the EIO; the failed step's file must
    # not exist, and the next checkpoint is a new file written from scratch
    # (the writer never fsyncs the same descriptor again to "succeed").
    backup = tmp_path / "backup"
    model, (x, y), _, state_a = _first_epoch(backup)
    os.environ["FASTBACKUP_ON_ERROR"] = "warn"
    try:
        cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False)
    finally:
        del os.environ["FASTBACKUP_ON_ERROR"]
    arm = _ArmAtTrainBegin([("fsync", 1, errno.EIO)])
    inspect = _Inspect(cb, 2, lambda: _assert_checkpoint_a_intact(backup, state_a))
    with caplog.at_level(logging.WARNING, logger="fastbackup"):
        history = model.fit(x, y, epochs=3, batch_size=8, verbose=0,
                            callbacks=[cb, arm, inspect])
    assert inspect.ran
    assert len(history.history["loss"]) == 2  # epochs 1 and 2 trained
    assert "training goes on" in caplog.text and "Input/output error" in caplog.text
    # Step 1 (the fsync failure) never appeared; step 2 is the epoch-3 state.
    ckpts = LocalStore(str(backup)).list_checkpoints()
    assert [s for s, _ in ckpts] == [2]
    with CheckpointReader(ckpts[0][1]) as reader:
        reader.verify()
        assert reader.epoch == 3
    assert cb.stats.saves == 1 and cb.stats.last_durable == (2, 3, 0)
    assert _temp_files(backup) == []


# fsync has its own warn test below; real ENOSPC has one on a tmpfs.
WARN_CASES = [c for c in FAILPOINT_CASES
              if c[0] in ("short_then_enospc", "rename_exdev", "open_eacces",
                          "close_eio")]


@pytest.mark.parametrize(
    "failpoints",
    [fp for _, fp, _, _ in WARN_CASES],
    ids=[c[0] for c in WARN_CASES],
)
def test_failed_write_with_warn_keeps_training(tmp_path, monkeypatch, caplog,
                                               failpoints):
    backup = tmp_path / "backup"
    model, (x, y), _, state_a = _first_epoch(backup)
    monkeypatch.setenv("FASTBACKUP_ON_ERROR", "warn")
    cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False)
    # Failpoints fire once; the short-write cap stays until cleared.
    inspect = _Inspect(cb, 2, lambda: _assert_checkpoint_a_intact(backup, state_a))
    with caplog.at_level(logging.WARNING, logger="fastbackup"):
        history = model.fit(x, y, epochs=3, batch_size=8, verbose=0,
                            callbacks=[cb, _ArmAtTrainBegin(failpoints),
                                       inspect])
    assert inspect.ran and len(history.history["loss"]) == 2
    assert "a checkpoint write failed" in caplog.text
    [(step, path)] = LocalStore(str(backup)).list_checkpoints()
    with CheckpointReader(path) as reader:
        reader.verify()
        assert (step, reader.epoch) == (2, 3)
    assert _temp_files(backup) == []


def test_directory_fsync_failure_keeps_previous_checkpoint(tmp_path):
    # After the rename, a failed directory fsync leaves the new file in place
    # but not known durable: it is reported, and the previous checkpoint is
    # not pruned (it is the one known to be durable).
    backup = tmp_path / "backup"
    model, (x, y), _, state_a = _first_epoch(backup)
    cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False)
    # The failing save (end of epoch 1) is the last one: a later save
    # could succeed and replace A before the error reaches `fit`.
    with pytest.raises(fastbackup.BackupWriteError) as info:
        model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
            cb, _ArmAtTrainBegin([("dirfsync", 1, errno.EIO)])])
    assert info.value.errno == errno.EIO
    assert info.value.filename == str(backup)
    assert cb.stats.saves == 0 and cb.stats.last_durable is None
    _assert_checkpoint_a_intact(backup, state_a, steps=(1, 0))


def test_short_writes_still_give_an_exact_checkpoint(tmp_path):
    # write(2) may write less than asked (always, above 2 GiB on Linux): the
    # loop must advance, not fail, not lose bytes.
    backup = tmp_path / "backup"
    native.set_failpoint("short_write", 7, 0)
    x, y = make_data(n=16)
    model = _model()
    cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    native.clear_failpoints()
    expected = all_state(model)
    [(_, path)] = LocalStore(str(backup)).list_checkpoints()
    assert cb.stats.bytes_written // cb.stats.saves > 7 * 100
    assert os.path.getsize(path) == cb.stats.bytes_written // cb.stats.saves
    fresh = fresh_model()
    fresh.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(backup, delete_checkpoint=False)])
    assert_state_equal(all_state(fresh), expected)


# Directory removed during training ---------------------------------------------


def test_backup_dir_removed_during_training_raises(tmp_path):
    backup = tmp_path / "backup"
    model, (x, y), _, _ = _first_epoch(backup)
    cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False)
    remove = _AtEpochBegin(1, lambda: shutil.rmtree(backup))
    with pytest.raises(fastbackup.BackupWriteError) as info:
        model.fit(x, y, epochs=3, batch_size=8, verbose=0,
                  callbacks=[cb, remove])
    assert info.value.errno == errno.ENOENT
    assert str(backup) in info.value.filename
    # Not silently recreated: the lock that kept other trainings out of this
    # directory went with it.
    assert not backup.exists()


def test_backup_dir_removed_during_training_warns(tmp_path, monkeypatch, caplog):
    backup = tmp_path / "backup"
    model, (x, y), _, _ = _first_epoch(backup)
    monkeypatch.setenv("FASTBACKUP_ON_ERROR", "warn")
    cb = fastbackup.BackupAndRestore(backup)
    remove = _AtEpochBegin(1, lambda: shutil.rmtree(backup))
    with caplog.at_level(logging.WARNING, logger="fastbackup"):
        history = model.fit(x, y, epochs=3, batch_size=8, verbose=0,
                            callbacks=[cb, remove])
    assert len(history.history["loss"]) == 2
    assert "No such file or directory" in caplog.text
    assert cb.stats.saves == 0
    assert not backup.exists()
    # The next fit starts afresh: the directory is created and locked again.
    # (A new model: Keras keeps a restored `_initial_epoch` on the old one.)
    _model().fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(backup, delete_checkpoint=False)])
    assert [s for s, _ in LocalStore(str(backup)).list_checkpoints()] == [0]


def test_backup_dir_removed_between_fits_of_one_callback(tmp_path):
    # An interrupted fit keeps its lock; if the user then deletes the backup
    # directory and reruns fit with the same callback, it trains from scratch
    # into a new, locked directory.
    from tests.conftest import InterruptAt

    backup = tmp_path / "backup"
    x, y = make_data(n=16)
    model = _model()
    cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False)
    with pytest.raises(RuntimeError):
        model.fit(x, y, epochs=3, batch_size=8, verbose=0,
                  callbacks=[cb, InterruptAt(2)])
    cb.wait_until_finished()
    shutil.rmtree(backup)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    assert [s for s, _ in LocalStore(str(backup)).list_checkpoints()] == [0]
    assert os.path.exists(os.path.join(backup, LOCK_NAME))
    cb.on_train_end()


# Real faults: a full tmpfs, a read-only mount -------------------------------------


def _mount(args, target):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to create a real filesystem fault")
    proc = subprocess.run(["mount", *args, str(target)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount refused here: {proc.stderr.strip()}")


def _umount(target):
    proc = subprocess.run(["umount", str(target)], capture_output=True)
    if proc.returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs"], mnt)
    yield mnt
    _release(mnt / "backup")
    _umount(mnt)


def _fill(directory):
    """Fills the filesystem of `directory`; returns the filler's path."""
    path = os.path.join(directory, "filler")
    chunk = b"\0" * 4096
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    return path


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_real_enospc_on_a_full_tmpfs(small_tmpfs, monkeypatch, caplog, on_error):
    backup = small_tmpfs / "backup"
    model, (x, y), _, state_a = _first_epoch(backup)
    filler = _fill(small_tmpfs)
    if on_error == "warn":
        monkeypatch.setenv("FASTBACKUP_ON_ERROR", "warn")
    cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False)
    if on_error == "raise":
        with pytest.raises(fastbackup.BackupWriteError) as info:
            model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
        assert info.value.errno == errno.ENOSPC
        assert str(backup) in info.value.filename
        assert "No space left on device" in str(info.value)
    else:
        with caplog.at_level(logging.WARNING, logger="fastbackup"):
            history = model.fit(x, y, epochs=3, batch_size=8, verbose=0,
                                callbacks=[cb])
        assert len(history.history["loss"]) == 2
        assert caplog.text.count("No space left on device") >= 2
    assert cb.stats.saves == 0
    _assert_checkpoint_a_intact(backup, state_a)
    # Once space is freed, saving works again.
    os.unlink(filler)
    _release(backup)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
        fastbackup.BackupAndRestore(backup, delete_checkpoint=False,
                                    save_freq=1)])
    [(step, path)] = LocalStore(str(backup)).list_checkpoints()
    with CheckpointReader(path) as reader:
        reader.verify()
        assert step > 0 and reader.epoch == 1


@pytest.fixture
def read_only_later(tmp_path):
    """A directory, and a function that turns it read-only in place.

    A bind mount of the directory onto itself, remounted read-only, covers
    every new path lookup (a filesystem remounted read-only after an I/O
    error looks the same to the writer); remounting the filesystem itself is
    refused while the lock file is open for writing.
    """
    base = tmp_path / "base"
    base.mkdir()
    mounted = []

    def make_read_only():
        _mount(["--bind", str(base)], base)
        mounted.append(base)
        _mount(["-o", "remount,bind,ro"], base)

    yield base, make_read_only
    _release(base / "backup")
    for target in mounted:
        _umount(target)


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_backup_dir_turning_read_only_during_training(
    read_only_later, monkeypatch, caplog, on_error
):
    base, make_read_only = read_only_later
    backup = base / "backup"
    # Probe the mount before training, so that a refusal skips cheaply.
    make_read_only()
    _umount(base)
    model, (x, y), _, state_a = _first_epoch(backup)
    if on_error == "warn":
        monkeypatch.setenv("FASTBACKUP_ON_ERROR", "warn")
    cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False)
    turn = _AtEpochBegin(1, make_read_only)
    if on_error == "raise":
        with pytest.raises(fastbackup.BackupWriteError) as info:
            model.fit(x, y, epochs=2, batch_size=8, verbose=0,
                      callbacks=[cb, turn])
        assert info.value.errno == errno.EROFS
        assert str(backup) in info.value.filename
    else:
        with caplog.at_level(logging.WARNING, logger="fastbackup"):
            history = model.fit(x, y, epochs=3, batch_size=8, verbose=0,
                                callbacks=[cb, turn])
        assert len(history.history["loss"]) == 2
        assert "Read-only file system" in caplog.text
    assert cb.stats.saves == 0
    _assert_checkpoint_a_intact(backup, state_a)


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_read_only_backup_dir_at_start_is_a_clear_error(read_only_later,
                                                        monkeypatch, on_error):
    # The lock cannot be taken: a plain OSError from on_train_begin, also
    # under warn (which covers checkpoint writes, not the start).
    base, make_read_only = read_only_later
    backup = base / "backup"
    model, (x, y), _, state_a = _first_epoch(backup)
    _release(backup)
    make_read_only()
    if on_error == "warn":
        monkeypatch.setenv("FASTBACKUP_ON_ERROR", "warn")
    model2 = _model()
    model2.build((None, 6))
    model2.optimizer.build(model2.trainable_variables)
    # On JAX, fit builds compiled metrics before on_train_begin.
    before = all_state(model2, metrics=False)
    with pytest.raises(OSError) as info:
        model2.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[
            fastbackup.BackupAndRestore(backup, delete_checkpoint=False)])
    assert info.value.errno == errno.EROFS
    assert str(backup) in info.value.filename
    # Nothing was trained, and the checkpoint is intact.
    assert_state_equal(all_state(model2, metrics=False), before)
    _assert_checkpoint_a_intact(backup, state_a)


def test_model_config_write_failure_only_costs_export_its_config(tmp_path,
                                                                 caplog):
    # The config file serves `export` alone: failing to write it must not
    # stop training or its checkpoints, which then record no config.
    backup = tmp_path / "backup"
    x, y = make_data(n=16)
    model = _model()
    cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False)
    native.set_failpoint("fsync", 1, errno.EIO)  # the config file's fsync
    with caplog.at_level(logging.WARNING, logger="fastbackup"):
        model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    native.clear_failpoints()
    assert "cannot write the model config" in caplog.text
    assert "Input/output error" in caplog.text
    assert cb.stats.saves == 1
    assert not (backup / MODEL_CONFIG_NAME).exists()
    assert _temp_files(backup) == []
    [(_, path)] = LocalStore(str(backup)).list_checkpoints()
    with CheckpointReader(path) as reader:
        reader.verify()
        assert "model_config" not in reader.meta["extra"]
