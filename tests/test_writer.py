"""Tests of `fastbackup.writer.BackgroundWriter`: the buffer pool, the writer
thread, coalescing, error propagation and shutdown."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fastbackup import format as fmt
from fastbackup.errors import BackupWriteError, FastBackupError
from fastbackup.format import CheckpointReader
from fastbackup.snapshot import HostSnapshot, TensorSpec
from fastbackup.stores.local import LocalStore
from fastbackup.writer import BackgroundWriter, WriterStats, as_write_error

WAIT = 60  # seconds; a bound against hangs, never a timing assertion


def make_snapshot(value: float, epoch: int = 0, batch: int = 0) -> HostSnapshot:
    arrays = [np.full((4, 3), value, np.float32), np.arange(5, dtype=np.int64)]
    specs = [
        TensorSpec(f"model.{i}", f"layer/var_{i}", a.dtype, a.shape)
        for i, a in enumerate(arrays)
    ]
    return HostSnapshot(specs, arrays, epoch=epoch, batch=batch,
                        taken_at=time.time())


def read_back(path) -> tuple[tuple[int, int, int], np.ndarray]:
    with CheckpointReader(path) as reader:
        reader.verify()
        entry = reader.entries[0]
        out = np.empty(entry.shape, entry.np_dtype)
        reader.read_tensor(entry, out)
        return (reader.step, reader.epoch, reader.batch), out


class Gate:
    """Holds every commit on the writer thread until released."""

    def __init__(self, monkeypatch):
        self.real = LocalStore.commit
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.threads: list[threading.Thread] = []
        self.steps: list[int] = []
        # A function, so that the store is passed as the method's self.
        monkeypatch.setattr(LocalStore, "commit",
                            lambda store, *a, **k: self.commit(store, *a, **k))

    def commit(self, store, step, encoded, sync, **kwargs):
        self.threads.append(threading.current_thread())
        self.steps.append(step)
        self.entered.release()
        assert self.release.wait(WAIT)
        return self.real(store, step, encoded, sync, **kwargs)

    def wait_entered(self):
        assert self.entered.acquire(timeout=WAIT)


@pytest.fixture
def gate(monkeypatch):
    g = Gate(monkeypatch)
    yield g
    g.release.set()


@pytest.fixture
def writers():
    """Makes writers and closes them at the end of the test."""
    made: list[BackgroundWriter] = []

    def make(directory, keep=1, buffers=1):
        w = BackgroundWriter(str(directory), fmt.CompressionPolicy(None),
                             keep=keep, sync=False, buffers=buffers)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def save(writer, value, epoch=0, batch=0):
    slot = writer.checkout(block=True)
    writer.submit(slot, make_snapshot(value, epoch, batch))
    return slot


# The pool ----------------------------------------------------------------------


def test_single_buffer_checkout_and_submit(tmp_path, writers, gate):
    w = writers(tmp_path)
    slot = w.checkout(block=False)
    assert slot is not None
    # While the only buffer is being filled, there is nothing to hand out.
    assert w.checkout(block=False) is None
    assert not w.busy()
    snapshot = make_snapshot(1.0, epoch=2, batch=3)
    w.submit(slot, snapshot)
    gate.wait_entered()
    assert w.busy()
    # ...nor while it is being written.
    assert w.checkout(block=False) is None
    gate.release.set()
    w.wait_until_finished()
    assert not w.busy()
    [(step, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    (position, values) = read_back(path)
    assert position == (0, 2, 3) and (values == 1.0).all()
    # The same buffer comes back, still holding the snapshot to reuse.
    again = w.checkout(block=False)
    assert again is slot and again.snapshot is snapshot
    assert w.stats.coalesced == 0


def test_single_buffer_checkout_blocks_until_written(tmp_path, writers, gate):
    w = writers(tmp_path)
    first = save(w, 1.0)
    gate.wait_entered()
    got = []
    t = threading.Thread(target=lambda: got.append(w.checkout(block=True)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and got == []  # held by the write in progress
    gate.release.set()
    t.join(WAIT)
    assert not t.is_alive() and got == [first]
    assert LocalStore(str(tmp_path)).list_checkpoints()


def test_two_buffers_coalesce_the_pending_snapshot(tmp_path, writers, gate):
    w = writers(tmp_path, keep=2, buffers=2)
    a = save(w, 1.0, epoch=0, batch=0)
    gate.wait_entered()  # a is being written, held
    b = w.checkout(block=False)
    assert b is not None and b is not a
    w.submit(b, make_snapshot(2.0, epoch=0, batch=1))
    assert w.stats.coalesced == 0
    # Both buffers busy: the pending one is taken back for the newer state.
    c = w.checkout(block=False)
    assert c is b and w.stats.coalesced == 1
    w.submit(c, make_snapshot(3.0, epoch=0, batch=2))
    c2 = w.checkout(block=False)
    assert c2 is b and w.stats.coalesced == 2
    w.submit(c2, make_snapshot(4.0, epoch=0, batch=3))
    gate.release.set()
    w.wait_until_finished()
    # Two writes: the first state, then only the newest pending one.
    assert gate.steps == [0, 1]
    found = LocalStore(str(tmp_path)).list_checkpoints()
    assert [s for s, _ in found] == [1, 0]
    assert read_back(found[1][1])[0] == (0, 0, 0)
    position, values = read_back(found[0][1])
    assert position == (1, 0, 3) and (values == 4.0).all()
    assert w.stats.saves == 2


def test_two_buffers_do_not_block_while_one_is_written(tmp_path, writers, gate):
    w = writers(tmp_path, buffers=2)
    a = save(w, 1.0)
    gate.wait_entered()
    b = w.checkout(block=False)
    assert b is not None and b is not a
    w.cancel(b)
    assert w.checkout(block=False) is b


def test_cancel_returns_the_buffer(tmp_path, writers):
    w = writers(tmp_path)
    slot = w.checkout(block=False)
    assert w.checkout(block=False) is None
    w.cancel(slot)
    assert w.checkout(block=False) is slot
    w.cancel(slot)
    w.wait_until_finished()
    assert LocalStore(str(tmp_path)).list_checkpoints() == []


# The thread --------------------------------------------------------------------


def test_writes_run_on_a_named_daemon_thread(tmp_path, writers, gate):
    w = writers(tmp_path)
    save(w, 1.0)
    gate.wait_entered()
    gate.release.set()
    w.wait_until_finished()
    [thread] = gate.threads
    assert thread is not threading.current_thread()
    assert thread.name == "fastbackup-writer"
    assert thread.daemon


def test_one_thread_serves_successive_writes(tmp_path, writers, gate):
    w = writers(tmp_path)
    gate.release.set()
    for i in range(3):
        save(w, float(i))
        w.wait_until_finished()
    assert len(set(gate.threads)) == 1 and gate.steps == [0, 1, 2]


def test_blocking_checkout_never_replaces_a_queued_snapshot(tmp_path, writers,
                                                            gate):
    w = writers(tmp_path, keep=2)
    slot = w.checkout(block=True)
    # Holding the writer's (reentrant) lock keeps its thread from taking
    # the queued snapshot before the second checkout starts waiting.
    got = []
    waiter = threading.Thread(target=lambda: got.append(w.checkout(block=True)))
    with w._cond:
        w.submit(slot, make_snapshot(1.0, batch=1))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and got == []
    # The queued snapshot is written first; only then is its buffer free.
    gate.release.set()
    waiter.join(30)
    assert got == [slot] and w.stats.coalesced == 0
    w.submit(slot, make_snapshot(2.0, batch=2))
    w.wait_until_finished()
    assert gate.steps == [0, 1]
    (_, newest), (_, first) = LocalStore(str(tmp_path)).list_checkpoints()
    assert read_back(first)[0] == (0, 0, 1)
    position, values = read_back(newest)
    assert position == (1, 0, 2) and (values == 2.0).all()


def test_wait_until_finished_blocks_until_durable(tmp_path, writers, gate):
    w = writers(tmp_path)
    save(w, 5.0, epoch=1)
    gate.wait_entered()
    done = threading.Event()
    seen = []

    def waiter():
        w.wait_until_finished()
        seen.extend(LocalStore(str(tmp_path)).list_checkpoints())
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not done.wait(0.2)
    assert LocalStore(str(tmp_path)).list_checkpoints() == []
    gate.release.set()
    t.join(WAIT)
    assert done.is_set()
    # When wait_until_finished returned, the checkpoint was complete.
    [(_, path)] = seen
    assert read_back(path)[0] == (0, 1, 0)
    assert w.stats.last_durable == (0, 1, 0)


def test_steps_stats_and_pruning(tmp_path, writers):
    w = writers(tmp_path, keep=1)
    w.next_step = 7
    for i in range(3):
        save(w, float(i), epoch=i)
        w.wait_until_finished()
    [(step, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    assert step == 9 and read_back(path)[0] == (9, 2, 0)
    s = w.stats
    assert s.saves == 3 and len(s.write_seconds) == 3
    assert s.raw_bytes == 3 * (12 * 4 + 5 * 8)
    assert s.bytes_written == 3 * os.path.getsize(path)
    assert s.last_durable == (9, 2, 0)
    assert s.compression_ratio == s.raw_bytes / s.bytes_written


def test_bfloat16_snapshot_is_written(tmp_path, writers):
    import ml_dtypes

    array = np.array([1.5, -2.0, 3.0], dtype=ml_dtypes.bfloat16)
    spec = TensorSpec("model.0", "layer/w", array.dtype, array.shape)
    w = writers(tmp_path)
    slot = w.checkout(block=True)
    w.submit(slot, HostSnapshot([spec], [array]))
    w.wait_until_finished()
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    with CheckpointReader(path) as reader:
        reader.verify()
        [entry] = reader.entries
        assert entry.dtype == "bfloat16"
        out = np.empty(entry.shape, entry.np_dtype)
        reader.read_tensor(entry, out)
    assert out.tobytes() == array.tobytes()


def test_keep_two_keeps_the_previous_checkpoint(tmp_path, writers):
    w = writers(tmp_path, keep=2)
    for i in range(4):
        save(w, float(i))
        w.wait_until_finished()
    assert [s for s, _ in LocalStore(str(tmp_path)).list_checkpoints()] == [3, 2]


# Errors --------------------------------------------------------------------------


def fail_commit(monkeypatch, exc):
    calls = []

    def commit(store, step, encoded, sync, **kwargs):
        calls.append(step)
        raise exc

    monkeypatch.setattr(LocalStore, "commit", commit)
    return calls


def test_error_is_kept_and_raised_by_wait_until_finished(tmp_path, writers,
                                                         monkeypatch):
    original = OSError(errno.ENOSPC, "No space left on device", str(tmp_path))
    fail_commit(monkeypatch, original)
    w = writers(tmp_path)
    slot = save(w, 1.0)
    with pytest.raises(BackupWriteError) as info:
        w.wait_until_finished()
    err = info.value
    assert err.__cause__ is original
    assert err.errno == errno.ENOSPC and err.filename == str(tmp_path)
    assert "background checkpoint write failed" in str(err)
    assert "No space left on device" in str(err)
    assert isinstance(err, OSError) and isinstance(err, FastBackupError)
    # Raised once: the error is consumed, and the buffer is free again.
    w.wait_until_finished()
    assert w.checkout(block=False) is slot
    assert w.stats.saves == 0 and w.stats.last_durable is None


def test_error_stays_stored_without_raise_errors(tmp_path, writers, monkeypatch):
    original = RuntimeError("encoder exploded")
    fail_commit(monkeypatch, original)
    w = writers(tmp_path)
    save(w, 1.0)
    w.wait_until_finished(raise_errors=False)
    assert w.check_error() is original
    assert w.check_error() is None


def test_real_os_error_from_the_filesystem(tmp_path, writers):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    w = writers(not_a_dir)
    save(w, 1.0)
    with pytest.raises(BackupWriteError) as info:
        w.wait_until_finished()
    assert info.value.errno == errno.ENOTDIR
    assert isinstance(info.value.__cause__, OSError)
    assert not_a_dir.read_bytes() == b""


def test_writer_keeps_working_after_an_error(tmp_path, writers, monkeypatch):
    calls = fail_commit(monkeypatch, OSError(errno.EIO, "I/O error"))
    w = writers(tmp_path)
    save(w, 1.0)
    with pytest.raises(BackupWriteError):
        w.wait_until_finished()
    monkeypatch.undo()
    save(w, 2.0, epoch=5)
    w.wait_until_finished()
    [(step, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    # The failed write used step 0; the next one gets a new number.
    assert calls == [0] and step == 1
    position, values = read_back(path)
    assert position == (1, 5, 0) and (values == 2.0).all()


def test_as_write_error():
    wrapped = BackupWriteError(errno.EIO, "x")
    assert as_write_error(wrapped) is wrapped
    err = as_write_error(ValueError())
    assert err.errno == 0 and err.filename is None
    assert "ValueError" in str(err) and isinstance(err.__cause__, ValueError)


# Shutdown ------------------------------------------------------------------------


def test_close_flushes_then_stops_the_thread(tmp_path, monkeypatch, gate):
    w = BackgroundWriter(str(tmp_path), fmt.CompressionPolicy(None), keep=1,
                         sync=False)
    slot = save(w, 3.0, epoch=4)
    gate.wait_entered()
    closer = threading.Thread(target=w.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # the pending write comes first
    gate.release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    [thread] = gate.threads
    assert not thread.is_alive()
    [(_, path)] = LocalStore(str(tmp_path)).list_checkpoints()
    assert read_back(path)[0] == (0, 4, 0)
    assert slot.snapshot is None  # buffers released


def test_submit_after_close_starts_a_new_thread(tmp_path, writers, gate):
    w = writers(tmp_path, keep=2)
    gate.release.set()
    save(w, 1.0)
    w.close()
    save(w, 2.0)
    w.wait_until_finished()
    assert len(gate.threads) == 2
    assert gate.threads[0] is not gate.threads[1]
    assert gate.threads[1].name == "fastbackup-writer"
    assert [s for s, _ in LocalStore(str(tmp_path)).list_checkpoints()] == [1, 0]


def test_close_without_any_write(tmp_path):
    w = BackgroundWriter(str(tmp_path), fmt.CompressionPolicy(None), keep=1)
    w.close()
    w.wait_until_finished()
    assert os.listdir(tmp_path) == []


# A writer whose one write is pending at interpreter exit: the commit waits
# until the main thread (which may remove the directory first) lets it go.
EXIT_SCRIPT = """
import errno, os, shutil, sys, threading
from fastbackup import format as fmt
from fastbackup.stores.local import LocalStore
from fastbackup.writer import BackgroundWriter
from tests.test_writer import make_snapshot

directory, remove, failure = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
real = LocalStore.commit
entered, release = threading.Event(), threading.Event()

def commit(store, *args, **kwargs):
    entered.set()
    release.wait(60)
    if failure == "EIO":
        raise OSError(errno.EIO, "Input/output error", directory)
    if failure == "ENOENT":
        raise FileNotFoundError(errno.ENOENT, "No such file or directory",
                                os.path.join(directory, "gone.tmp"))
    return real(store, *args, **kwargs)

LocalStore.commit = commit
writer = BackgroundWriter(directory, fmt.CompressionPolicy(None), keep=1)
writer.submit(writer.checkout(block=True), make_snapshot(1.0))
assert entered.wait(60)
if remove:
    shutil.rmtree(directory)
release.set()
"""


@pytest.mark.parametrize("remove, failure, reported", [
    # Removed on purpose (a test's temporary directory cleaned up after an
    # exception): the write's ENOENT is no news.
    (True, "real", False),
    # Anything else is still reported.
    (True, "EIO", True),
    (False, "EIO", True),
    (False, "ENOENT", True),
])
def test_failed_write_at_exit_is_reported_unless_the_backup_was_removed(
        tmp_path, remove, failure, reported):
    directory = tmp_path / "backup"
    directory.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(directory), str(int(remove)),
         failure],
        capture_output=True, text=True, timeout=120, cwd=root, check=False)
    assert proc.returncode == 0, proc.stderr
    message = "fastbackup: the last checkpoint write failed at exit: "
    if reported:
        [line] = [l for l in proc.stderr.splitlines() if message in l]
        assert ("Input/output error" if failure == "EIO"
                else "gone.tmp") in line
    else:
        # Nothing from fastbackup (a backend's own start-up lines may be).
        assert "fastbackup" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("coalesced, kept_in, expected", [
    (0, "/ckpt/run", ("fastbackup: 3 checkpoint(s) written (4.2 kB); training "
                      "paused 2.0 ms per save (median); newest checkpoint: "
                      "step 5 (epoch 1, batch 2) in /ckpt/run")),
    # Coalesced saves are not lost saves: a later step's state was saved.
    (2, "/ckpt/run", ("fastbackup: 3 checkpoint(s) written (4.2 kB); training "
                      "paused 2.0 ms per save (median); 2 due save(s) taken "
                      "at a later step, the writer being busy; newest "
                      "checkpoint: step 5 (epoch 1, batch 2) in /ckpt/run")),
    # The backup was deleted at the end of fit: no checkpoint is named.
    (0, None, ("fastbackup: 3 checkpoint(s) written (4.2 kB); training paused "
               "2.0 ms per save (median); backup deleted at the end of "
               "training (delete_checkpoint=True)")),
])
def test_summary_says_only_what_is_true(coalesced, kept_in, expected):
    stats = WriterStats(saves=3, coalesced=coalesced, bytes_written=4200,
                        last_durable=(5, 1, 2))
    assert stats.summary([0.001, 0.002, 0.004], kept_in) == expected
