"""The backup directory: names, temp-file cleanup, pruning, atomic commit,
and the in-process side of the lock (the two-process side is in
tests/test_concurrency.py)."""

from __future__ import annotations

import errno
import gc
import os
import threading

import numpy as np
import pytest

from fastbackup import format as fmt
from fastbackup._compat import native
from fastbackup.errors import BackupDirLockedError
from fastbackup.format import CheckpointReader
from fastbackup.snapshot import HostSnapshot, TensorSpec
from fastbackup.stores import locks
from fastbackup.stores.local import LOCK_NAME, LocalStore
from fastbackup.stores.names import checkpoint_name


@pytest.fixture(autouse=True)
def _no_failpoints():
    native.clear_failpoints()
    yield
    native.clear_failpoints()


def _encoded(step=0, value=1.0):
    a = np.full((4, 4), value, "float32")
    snap = HostSnapshot([TensorSpec("model.0", "w", a.dtype, a.shape)], [a],
                        epoch=step, batch=0)
    return fmt.encode(snap, fmt.CompressionPolicy(None), step)


def test_names_and_listing(tmp_path):
    d = str(tmp_path)
    names = [
        "ckpt-000000000003.fbk", "ckpt-000000000012.fbk",
        "ckpt-000000000007.fbk",
        # Not checkpoints:
        "ckpt-3.fbk", "ckpt-000000000004.fbk.bak", "xckpt-000000000005.fbk",
        ".ckpt-000000000009.fbk.0123456789abcdef.tmp", "notes.txt",
        LOCK_NAME,
    ]
    for n in names:
        open(os.path.join(d, n), "wb").close()
    assert checkpoint_name(12) == "ckpt-000000000012.fbk"
    assert [s for s, _ in LocalStore(d).list_checkpoints()] == [12, 7, 3]
    assert LocalStore(str(tmp_path / "missing")).list_checkpoints() == []


def test_remove_temp_files_removes_only_temp_files(tmp_path):
    d = str(tmp_path)
    temps = [".ckpt-000000000001.fbk.0123456789abcdef.tmp",
             ".ckpt-000000000002.fbk.fedcba9876543210.tmp"]
    keep = ["ckpt-000000000001.fbk", ".ckpt-1.fbk.00.tmp", "other.tmp",
            ".ckpt-000000000001.fbk.XYZ.tmp", LOCK_NAME]
    for n in temps + keep:
        open(os.path.join(d, n), "wb").close()
    removed = LocalStore(d).remove_temp_files()
    assert sorted(os.path.basename(p) for p in removed) == sorted(temps)
    assert sorted(os.listdir(d)) == sorted(keep)
    assert LocalStore(str(tmp_path / "missing")).remove_temp_files() == []


def test_commit_is_atomic_and_leaves_no_temp_file(tmp_path):
    d = str(tmp_path)
    result = LocalStore(d).commit(5, _encoded(5), sync=True)
    assert os.listdir(d) == ["ckpt-000000000005.fbk"]
    assert result.nbytes == os.path.getsize(result.path)
    with CheckpointReader(result.path) as reader:
        reader.verify()
        assert reader.step == 5


@pytest.mark.parametrize("op", ["open", "write", "fsync", "close", "rename"])
def test_failed_commit_leaves_nothing_and_keeps_the_old_file(tmp_path, op):
    d = str(tmp_path)
    old = LocalStore(d).commit(1, _encoded(1, 1.0), sync=True)
    before = open(old.path, "rb").read()
    native.set_failpoint(op, 1, errno.EIO)
    with pytest.raises(OSError) as info:
        # Same step: a failed write must not even touch a file it would
        # replace.
        LocalStore(d).commit(1, _encoded(1, 2.0), sync=True)
    assert info.value.errno == errno.EIO
    assert sorted(os.listdir(d)) == ["ckpt-000000000001.fbk"]
    assert open(old.path, "rb").read() == before


def test_prune_keeps_the_newest(tmp_path):
    d = str(tmp_path)
    for step in (0, 1, 2, 3):
        LocalStore(d).commit(step, _encoded(step), sync=False)
    LocalStore(d).prune(keep=2)
    assert [s for s, _ in LocalStore(d).list_checkpoints()] == [3, 2]
    LocalStore(d).prune(keep=1)
    assert [s for s, _ in LocalStore(d).list_checkpoints()] == [3]


# The in-process lock -------------------------------------------------------------


class Owner:
    """Stands for a callback: the lock holds it by weak reference."""

    def __init__(self):
        self.flushed = 0

    def flush(self):
        self.flushed += 1


def _acquire(d, owner):
    LocalStore(d).acquire_lock(owner, owner.flush)


def test_lock_file_holds_the_pid(tmp_path):
    d = str(tmp_path / "b")
    owner = Owner()
    _acquire(d, owner)
    try:
        with open(os.path.join(d, LOCK_NAME)) as f:
            assert f.read() == str(os.getpid())
    finally:
        LocalStore(d).release_lock(owner)
    assert locks.held(os.path.realpath(d)) is None


def test_another_thread_is_refused_while_the_holder_lives(tmp_path):
    d = str(tmp_path)
    owner = Owner()
    _acquire(d, owner)
    errors = []

    def other():
        try:
            _acquire(d, Owner())
        except BackupDirLockedError as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    try:
        [error] = errors
        assert error.errno == errno.EBUSY and isinstance(error, OSError)
        assert "another BackupAndRestore" in str(error)
    finally:
        LocalStore(d).release_lock(owner)


def test_same_thread_takes_over_after_flushing_the_holder(tmp_path):
    # A fit that raised never released its lock; a new callback on the
    # same thread (the documented way to resume) takes it over once the
    # old one's writes are flushed.
    d = str(tmp_path)
    first, second = Owner(), Owner()
    _acquire(d, first)
    _acquire(d, second)
    assert first.flushed == 1
    LocalStore(d).release_lock(first)  # not the holder any more: no effect
    assert locks.held(os.path.realpath(d)) is not None
    LocalStore(d).release_lock(second)
    assert locks.held(os.path.realpath(d)) is None


def test_collected_holder_can_be_taken_over_from_another_thread(tmp_path):
    d = str(tmp_path)
    owner = Owner()
    _acquire(d, owner)
    flushed = []
    locks.held(os.path.realpath(d)).flush = lambda: flushed.append(1)
    del owner
    gc.collect()
    taker = Owner()
    t = threading.Thread(target=_acquire, args=(d, taker))
    t.start()
    t.join()
    assert flushed == [1]  # the collected callback's writer was flushed
    LocalStore(d).release_lock(taker)


def test_directory_removed_while_locked_is_locked_afresh(tmp_path):
    # The lock file went with the directory: the old lock guards nothing,
    # so the next acquisition creates and locks a new one.
    import shutil

    d = str(tmp_path / "b")
    owner = Owner()
    _acquire(d, owner)
    fds = len(os.listdir("/proc/self/fd"))
    shutil.rmtree(d)
    _acquire(d, owner)
    try:
        assert os.path.isfile(os.path.join(d, LOCK_NAME))
        held = locks.held(os.path.realpath(d))
        st = os.stat(os.path.join(d, LOCK_NAME))
        assert os.fstat(held.handle).st_ino == st.st_ino
        assert len(os.listdir("/proc/self/fd")) == fds  # old one closed
    finally:
        LocalStore(d).release_lock(owner)
