"""Chaos campaign: `python3 -m benchmarks.chaos --help`.

Each trial trains a small deterministic job with a save after every batch
into a backup location of its own, injects one fault drawn at random, then
restarts the job at once, exactly as a supervisor would, and checks:

* the restore succeeds, names the newest checkpoint committed before the
  restart, and its state (weights, optimizer, metrics) equals, bitwise, the
  state an uninterrupted run of the same job had at that checkpoint's step;
* how many steps were lost against the steps completed before the fault;
* after the restarted `fit` runs to its end (`delete_checkpoint=True`),
  nothing is left behind: no file or object under the location (checkpoint,
  temporary file, commit record, lease) and, on the buckets, no multipart
  upload in progress.

Outcomes per trial: `ok`, `lost` (a committed checkpoint was not restored,
or an older one was), `inconsistent` (the restored state is not the one of
its step), `unrestorable` (the restart's restore raised), `person` (the
restart needed a person: it raised otherwise, hung, or left something
behind). "Left behind" is counted on its own too, since on the buckets the
multipart uploads of a killed writer are a known leftover (see
docs/remote-storage.md).

Faults, each at a random instant (the `FAULTS` table below says which store
takes which): `kill -9` after a random step, during the snapshot on the
training thread, mid-write (local: between two writes of the file; bucket:
while the upload's request is held unanswered by the proxy), between the
write and its commit; SIGTERM (with `handle_sigterm`) followed by SIGKILL
after a grace shorter than a save, or a grace of seconds; on the local
disk, the C extension's failpoints (`ENOSPC`, `EIO` from `fsync`, short
writes then `ENOSPC`, `EROFS` from `open`); on the buckets, through a
fault proxy, a window of dropped connections, 500s, 503s or stalled
requests (past a 1 s request timeout) followed by a kill, an outage that
outlasts the retries, and the lease taken over by another job.

The concurrency checks: two jobs racing for one location (`--races` times
per store), exactly one trains and the other raises `BackupDirLockedError`
before its first step; `--jobs` jobs with their own locations on one
bucket at once, each backs up and restores its final state bitwise.

One process imports TensorFlow and Keras without running an op and forks
every job (tests/crash_worker.py's zygote), so a trial costs a model build,
not an import; a trial's restart runs while the next trial trains (each
bucket has two fault proxies, taken in turn, so that one trial's faults
never reach the other's restart). Object-store clients are created in the forked jobs only:
the zygote never starts obstore's runtime. The servers (moto,
fake-gcs-server behind tests/gcs_adapter.py) run as processes of their own
and every job reaches them through a `FaultProxy`.

Two-process JAX jobs are not part of this harness (see the note in
docs/reliability.md).
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import random
import shutil
import signal
import statistics
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, ClassVar, Self

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import fastbackup
from fastbackup._compat import native
from tests import crash_worker as job
from tests.object_servers import everything_under

# Faults, and the stores that take them.
LOCAL, BUCKETS = ("local",), ("s3", "gs")
FAULTS: dict[str, tuple[str, ...]] = {
    "kill9-step": LOCAL + BUCKETS,
    "kill9-snapshot": LOCAL + BUCKETS,
    "kill9-write": LOCAL + BUCKETS,
    "kill9-before-commit": LOCAL + BUCKETS,
    "sigterm-short-grace": LOCAL + BUCKETS,
    "sigterm-long-grace": LOCAL + BUCKETS,
    "enospc": LOCAL,
    "eio-fsync": LOCAL,
    "short-writes-enospc": LOCAL,
    "erofs": LOCAL,
    "drop": BUCKETS,
    "500": BUCKETS,
    "503": BUCKETS,
    "stall": BUCKETS,
    "outage": BUCKETS,
    "lease-lost": BUCKETS,
}
OUTCOMES = ("ok", "lost", "inconsistent", "unrestorable", "person")

# Progress file of a training job: steps completed, "finished", and the
# pause point it is waiting at (0: none).
_STEPS, _FINISHED, _PAUSED = 0, 8, 16
_PAUSE_POINTS = {"snapshot": 1, "write": 2, "before-commit": 3}
# A job paused at a pause point waits this long for its kill.
_PAUSE_SECONDS = 10.0
# Settings of every job on a bucket: a stalled request is abandoned after
# 1 s; an outage fails a write after 2 s of retries; a lease is renewed
# every 0.5 s (so a lease taken by another job is noticed within a step or
# two).
_BUCKET_ENV = {
    "FASTBACKUP_REQUEST_TIMEOUT_SECONDS": "1",
    "FASTBACKUP_RETRY_SECONDS": "2",
    "FASTBACKUP_LEASE_SECONDS": "2",
}
_LONG_GRACE = 20.0
_STOPPED_ON_ERROR = 3
_MULTI = os.path.join(_ROOT, "tests", "multiprocess_worker.py")


# Jobs (forked children) -------------------------------------------------------


def _put(fd: int, offset: int, value: int) -> None:
    os.pwrite(fd, struct.pack("<q", value), offset)


def _read(path: str) -> tuple[int, bool, int]:
    try:
        with open(path, "rb") as f:
            data = f.read(24).ljust(24, b"\0")
    except FileNotFoundError:
        return 0, False, 0
    steps, finished, paused = struct.unpack("<qqq", data)
    return steps, finished == -1, paused


def _pause_at(point: str, step: int, fd: int) -> Callable[[], None]:
    """A hook that, at its first call once the job has completed `step`
    steps, records `point` in the progress file and waits there for the
    kill. (Not the `step`-th call: saves that fall due while the writer is
    busy are coalesced, so a job may write fewer checkpoints than steps.)"""
    fired = [False]

    def hook() -> None:
        if fired[0]:
            return
        steps = struct.unpack("<q", os.pread(fd, 8, _STEPS).ljust(8, b"\0"))[0]
        if steps >= step:
            fired[0] = True
            _put(fd, _PAUSED, _PAUSE_POINTS[point])
            time.sleep(_PAUSE_SECONDS)
    return hook


def _install_pause(fault: str, step: int, fd: int, bucket: bool) -> None:
    """Puts the pause point of a `kill9-*` fault in the job's write path."""
    from fastbackup import snapshot
    from fastbackup.stores import local, object_store

    if fault == "kill9-snapshot":
        hook = _pause_at("snapshot", step, fd)
        real_take = snapshot.Snapshotter.take_split

        def take_split(self: Any, *args: Any, **kwargs: Any) -> Any:
            hook()
            return real_take(self, *args, **kwargs)
        snapshot.Snapshotter.take_split = take_split  # type: ignore[method-assign]
    elif fault == "kill9-write" and not bucket:
        hook = _pause_at("write", step, fd)
        local.native = _PausingNative(native, hook, None)  # type: ignore[assignment]
    elif fault == "kill9-before-commit" and not bucket:
        hook = _pause_at("before-commit", step, fd)
        local.native = _PausingNative(native, None, hook)  # type: ignore[assignment]
    elif fault == "kill9-before-commit":
        # Uploaded, not yet named by the commit record.
        hook = _pause_at("before-commit", step, fd)
        real_write = object_store.ObjectStore._write_record

        def write_record(self: Any, entries: Any) -> None:
            hook()
            real_write(self, entries)
        object_store.ObjectStore._write_record = write_record  # type: ignore[method-assign]


class _PausingNative:
    """The native module, with `AtomicFile` calling a hook after its first
    write (a half-written temporary file) or before its commit (a complete
    file, neither synced nor renamed)."""

    def __init__(self, real: Any, after_write: Any, before_commit: Any) -> None:
        self._real = real
        self._after_write = after_write
        self._before_commit = before_commit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def AtomicFile(self, *args: Any, **kwargs: Any) -> Any:
        return _PausingFile(self._real.AtomicFile(*args, **kwargs),
                            self._after_write, self._before_commit)


class _PausingFile:
    def __init__(self, real: Any, after_write: Any, before_commit: Any) -> None:
        self._f = real
        self._after_write = after_write
        self._before_commit = before_commit
        self._writes = 0

    def __enter__(self) -> Self:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: object) -> Any:
        return self._f.__exit__(*exc)

    def write(self, buffers: Any, checksum: bool = True) -> Any:
        crcs = self._f.write(buffers, checksum=checksum)
        self._writes += 1
        if self._writes == 1 and self._after_write is not None:
            self._after_write()
        return crcs

    @property
    def bytes_written(self) -> int:
        return self._f.bytes_written

    def commit(self) -> None:
        if self._before_commit is not None:
            self._before_commit()
        self._f.commit()


class _ArmFailpoint(keras.callbacks.Callback):
    """Arms a failpoint of the C extension after step `step` (the save of
    that step is the first to meet it)."""

    _FAILPOINTS: ClassVar[dict[str, list[tuple[str, int, int]]]] = {
        "enospc": [("write", 1, errno.ENOSPC)],
        "eio-fsync": [("fsync", 1, errno.EIO)],
        "short-writes-enospc": [("short_write", 100, 0),
                                ("write", 5, errno.ENOSPC)],
        "erofs": [("open", 1, errno.EROFS)],
    }

    def __init__(self, fault: str, step: int) -> None:
        super().__init__()
        self.failpoints = self._FAILPOINTS[fault]
        self.step = step
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.epoch * job.STEPS_PER_EPOCH + batch + 1 == self.step:
            for op, nth, err in self.failpoints:
                native.set_failpoint(op, nth, err)


def child_train(location: str, progress: str, fault: str, step: int,
                env: dict[str, str]) -> None:
    """A training job that meets `fault` around step `step`."""
    os.environ.update(env)
    job._child_setup()
    x, y = job._data()
    model = job._model()
    # Progress first: at a kill, the file never claims less than what the
    # checkpoint could hold.
    callbacks: list[Any] = [job._Progress(progress)]
    if fault in _ArmFailpoint._FAILPOINTS:
        callbacks.append(_ArmFailpoint(fault, step))
    _install_pause(fault, step, callbacks[0].fd, "://" in location)
    backup = fastbackup.BackupAndRestore(
        location, save_freq=1, delete_checkpoint=False,
        handle_sigterm=fault.startswith("sigterm"))
    callbacks.append(backup)
    try:
        model.fit(x, y, epochs=job.EPOCHS, batch_size=job.BATCH,
                  shuffle=False, verbose=0, callbacks=callbacks)
        backup.wait_until_finished()
    except (fastbackup.BackupWriteError, fastbackup.BackupDirLockedError) as e:
        # The fault's expected end: the job stops on the error (exit 3).
        print(f"stopped: {type(e).__name__}: {e}", flush=True)
        _put(callbacks[0].fd, _FINISHED, -1)
        os._exit(_STOPPED_ON_ERROR)
    # Exited by itself (finished, or stopped by SIGTERM).
    _put(callbacks[0].fd, _FINISHED, -1)


def _reference_step(epoch: int, batch: int) -> tuple[tuple[int, int], int]:
    # The save at the end of `fit` (one that fell due while the writer was
    # busy) records (EPOCHS, 0) and holds the state after the last batch.
    if (epoch, batch) == (job.EPOCHS, 0):
        return (job.EPOCHS - 1, job.STEPS_PER_EPOCH - 1), job.TOTAL_STEPS
    return (epoch, batch), epoch * job.STEPS_PER_EPOCH + batch + 1


class _CheckRestore(keras.callbacks.Callback):
    """After fastbackup's `on_train_begin` (it comes first in the list):
    compares the restored state with the reference of its step."""

    def __init__(self, backup: Any, ref_path: str, result: dict) -> None:
        super().__init__()
        self.backup, self.ref_path, self.result = backup, ref_path, result

    def on_train_begin(self, logs: Any = None) -> None:
        restored = self.backup.restored_from
        self.result["restored_from"] = restored
        if restored is None:
            return
        _, epoch, batch = restored
        key, step = _reference_step(epoch, batch)
        self.result["restored_step"] = step
        self.result["differs"] = job.differences(
            job._state(self.model), np.load(self.ref_path), key)


def _newest_committed(location_lib: Any, location: str) -> int | None:
    """The step of the newest committed checkpoint: on a local directory
    from the file names (not from the store's listing, which is under
    test), on a bucket from its commit record (which defines committed)."""
    from fastbackup.stores.names import CHECKPOINT_RE

    if "://" in location:
        newest = location_lib.open_store(location).list_checkpoints()
        return newest[0][0] if newest else None
    steps = [int(m.group(1)) for m in map(CHECKPOINT_RE.match,
                                          everything_under(location)) if m]
    return max(steps, default=None)


def child_restart(location: str, ref_path: str, out_path: str,
                  env: dict[str, str]) -> None:
    """The restarted job: restores, is checked, trains to the end."""
    result: dict[str, Any] = {}
    try:
        os.environ.update(env)
        from fastbackup.stores import location as location_lib

        job._child_setup()
        result["newest_step"] = _newest_committed(location_lib, location)
        x, y = job._data()
        model = job._model()
        # TensorFlow builds the compiled metrics at the first traced step;
        # a restore needs them built.
        model.evaluate(x[:2], y[:2], verbose=0)
        backup = fastbackup.BackupAndRestore(location, save_freq=1,
                                             resume_mid_epoch=True)
        check = _CheckRestore(backup, ref_path, result)
        start = time.monotonic()
        try:
            model.fit(x, y, epochs=job.EPOCHS, batch_size=job.BATCH,
                      shuffle=False, verbose=0, callbacks=[backup, check])
        except fastbackup.CheckpointCorruptError as e:
            result["unrestorable"] = f"{type(e).__name__}: {e}"
            return
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {e}"
            return
        result["fit_seconds"] = time.monotonic() - start
        result["left"] = everything_under(location)
    except BaseException:  # noqa: BLE001
        result["crash"] = traceback.format_exc()[-3000:]
    finally:
        with open(out_path, "w") as f:
            json.dump(result, f)


# The zygote: servers, proxy, faults ---------------------------------------------


def _fork(target: Callable[..., None], *args: Any,
          log: str | None = None) -> int:
    """Runs `target(*args)` in a child; its output goes to `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        if log is not None:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        try:
            target(*args)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    _reaped.pop(pid, None)  # a reused pid
    return pid


# Exit statuses of the children reaped so far: several waits may ask after
# one child (a fault's wait, then the trial's cleanup).
_reaped: dict[int, int] = {}


def _exited(pid: int) -> int | None:
    """The exit status of `pid` if it has exited, else `None`."""
    if pid not in _reaped:
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            return None
        _reaped[pid] = os.waitstatus_to_exitcode(status)
    return _reaped[pid]


def _kill(pid: int) -> int:
    """SIGKILLs `pid` unless it has exited; returns its exit status."""
    if pid not in _reaped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # a zombie: reaped below
        _, status = os.waitpid(pid, 0)
        _reaped[pid] = os.waitstatus_to_exitcode(status)
    return _reaped[pid]


class _Bucket:
    """One object-store server, its bucket, and the proxy jobs go through."""

    def __init__(self, scheme: str) -> None:
        from tests.object_servers import FaultProxy, GCSServer, MotoServer, s3_environ

        self.scheme = scheme
        if scheme == "s3":
            self.server: Any = MotoServer().start()
        else:
            self.server = GCSServer().start()
        self.name = self.server.create_bucket()
        # Two proxies, taken in turn by consecutive trials: a trial's faults
        # must not reach the previous trial's restart, which runs meanwhile.
        self.proxies = [FaultProxy(self.server.port) for _ in range(2)]
        self._environ = s3_environ if scheme == "s3" else (
            lambda endpoint: {"STORAGE_EMULATOR_HOST": endpoint})

    def proxy(self, number: int) -> Any:
        """The proxy of trial `number`."""
        return self.proxies[number % 2]

    def env(self, number: int) -> dict[str, str]:
        """The variables of trial `number`'s jobs: its proxy, and the
        settings of `_BUCKET_ENV`."""
        return {**self._environ(self.proxy(number).endpoint), **_BUCKET_ENV}

    def url(self, name: str) -> str:
        return f"{self.scheme}://{self.name}/chaos/{name}"

    def multipart_uploads(self) -> list[str]:
        if self.scheme == "s3":
            from tests.object_servers import list_multipart_uploads

            return list_multipart_uploads(self.server.endpoint, self.name)
        return self.server.multipart_uploads(self.name)

    def take_lease(self, url: str) -> None:
        """Writes the lease as another job would: another owner, naming a
        process of this host that has exited (so that the restart may take
        it over at once). Straight to the server, not through the proxy."""
        from fastbackup.stores import lease as lease_lib

        identity = {}
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        # The identity of a process that ran and is gone, read before it is
        # reaped (a zombie's /proc entry still has its start time).
        time.sleep(0.01)
        stat = lease_lib.proc_stat(pid)
        os.waitpid(pid, 0)
        identity = dict(lease_lib.this_process(), pid=pid)
        if stat is not None:
            identity["start"] = stat[1]
        body = json.dumps({"owner": "chaos-other-job", **identity,
                           "expires": time.time() + 2, "seconds": 2}).encode()
        key = url.split("/", 3)[3] + "/LEASE"
        _put_object(self, key, body)

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        self.server.stop()


def _put_object(bucket: _Bucket, key: str, body: bytes) -> None:
    # Plain HTTP, not obstore: the zygote must not start obstore's runtime
    # (the jobs it forks would inherit it half-alive).
    import urllib.request

    if bucket.scheme == "s3":
        import boto3

        boto3.client(
            "s3", endpoint_url=bucket.server.endpoint,
            aws_access_key_id="testing", aws_secret_access_key="testing",
            region_name="us-east-1",
        ).put_object(Bucket=bucket.name, Key=key, Body=body)
        return
    request = urllib.request.Request(
        f"{bucket.server.endpoint}/{bucket.name}/{key}", data=body,
        method="PUT")
    with urllib.request.urlopen(request, timeout=10) as answer:
        answer.read()


class Campaign:
    """Runs trials and races; collects records."""

    def __init__(self, workdir: str, seed: int, timeout: float = 120.0) -> None:
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.seed = seed
        self.timeout = timeout
        self.buckets: dict[str, _Bucket] = {}
        self.ref_path = os.path.join(workdir, "reference.npz")
        self.records: list[dict[str, Any]] = []
        self.races: list[dict[str, Any]] = []
        self.fleets: list[dict[str, Any]] = []
        self._count = 0

    # Setup ---------------------------------------------------------------

    def reference(self) -> None:
        pid = _fork(job.child_reference, self.ref_path,
                    os.path.join(self.workdir, "ref-backup"))
        if self._wait(pid, self.timeout) != 0:
            raise RuntimeError("the reference run failed")
        shutil.rmtree(os.path.join(self.workdir, "ref-backup"),
                      ignore_errors=True)

    def store(self, name: str) -> None:
        if name != "local" and name not in self.buckets:
            self.buckets[name] = _Bucket(name)

    def close(self) -> None:
        for bucket in self.buckets.values():
            bucket.close()

    def _location(self, store: str) -> tuple[str, dict[str, str]]:
        self._count += 1
        name = f"trial-{self._count}"
        if store == "local":
            return os.path.join(self.workdir, name), {}
        bucket = self.buckets[store]
        return bucket.url(name), bucket.env(self._count)

    def _wait(self, pid: int, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = _exited(pid)
            if code is not None:
                return code
            time.sleep(0.005)
        _kill(pid)
        return None

    # One trial -----------------------------------------------------------

    def trial(self, store: str, fault: str) -> dict[str, Any]:
        """Starts a trial: trains, meets the fault, and starts the restart,
        which `finish` waits for (the next trial trains meanwhile)."""
        location, env = self._location(store)
        number = self._count
        progress = os.path.join(self.workdir, f"progress-{number}")
        step = self.rng.randrange(2, job.TOTAL_STEPS - 4)
        record: dict[str, Any] = {"store": store, "fault": fault, "step": step,
                                  "number": number, "location": location}
        record["started"] = time.monotonic()
        log = os.path.join(self.workdir, f"trial-{number}.log")
        record["log"] = log
        proxy = self.buckets[store].proxy(number) if store != "local" else None
        pid = _fork(child_train, location, progress, fault, step, env, log=log)
        try:
            record.update(self._inject(store, fault, pid, progress, step,
                                       proxy, location))
        finally:
            # Reaped already when the job stopped by itself.
            if "exit" not in record:
                code = _exited(pid)
                record["exit"] = _kill(pid) if code is None else code
            if proxy is not None:
                proxy.fail_all(None)
        record["progress"], record["finished"], _ = _read(progress)
        os.unlink(progress)
        record["restart_pid"] = _fork(
            child_restart, location, self.ref_path,
            self._restart_out(number), env, log=log)
        return record

    def _restart_out(self, number: int) -> str:
        return os.path.join(self.workdir, f"restart-{number}.json")

    def finish(self, record: dict[str, Any]) -> dict[str, Any]:
        """Waits for a trial's restart and judges the trial."""
        store, number = record["store"], record.pop("number")
        location = record.pop("location")
        pid = record.pop("restart_pid")
        out_path = self._restart_out(number)
        if self._wait(pid, self.timeout) is None:
            record["restart_hang"] = f"no end within {self.timeout:g} s"
        else:
            try:
                with open(out_path) as f:
                    record.update(json.load(f))
                os.unlink(out_path)
            except (OSError, ValueError) as e:
                record["restart_hang"] = f"no result: {e}"
        record["seconds"] = time.monotonic() - record.pop("started")
        record["outcome"] = _outcome(record)
        if store != "local":
            record["multipart_left"] = len(
                self.buckets[store].multipart_uploads())
        if record["outcome"] == "ok":
            os.unlink(record["log"])
            if store == "local":
                shutil.rmtree(location, ignore_errors=True)
        return record

    def _until(self, done: Callable[[], bool], pid: int, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not done():
            if time.monotonic() > deadline:
                raise _Hang(f"{what} (timeout {self.timeout:g} s)")
            if _exited(pid) is not None:
                raise _Hang(f"the job exited before {what}")
            time.sleep(0.0005)

    def _inject(self, store: str, fault: str, pid: int, progress: str,
                step: int, proxy: Any, location: str) -> dict[str, Any]:
        """Meets `fault` around `step`; returns what was observed. The job
        is dead when this returns, or is killed by the caller."""
        out: dict[str, Any] = {}
        reached = lambda n: _read(progress)[0] >= n
        try:
            if fault == "kill9-step":
                self._until(lambda: reached(step), pid, f"step {step}")
                time.sleep(self.rng.uniform(0.0, 0.012))
            elif fault in ("kill9-snapshot", "kill9-before-commit") or (
                    fault == "kill9-write" and store == "local"):
                self._until(lambda: _read(progress)[2] != 0, pid,
                            "its pause point")
                time.sleep(self.rng.uniform(0.0, 0.004))
            elif fault == "kill9-write":
                # Every request from now on is held unanswered: the kill
                # lands while an upload (or the commit record) is in flight.
                self._until(lambda: reached(step), pid, f"step {step}")
                held = proxy.injected["stall"]
                proxy.fail_all("stall")
                self._until(lambda: proxy.injected["stall"] > held, pid,
                            "a request to stall")
                time.sleep(self.rng.uniform(0.0, 0.05))
            elif fault.startswith("sigterm"):
                self._until(lambda: reached(step), pid, f"step {step}")
                os.kill(pid, signal.SIGTERM)
                grace = (self.rng.uniform(0.0, 0.003)
                         if fault == "sigterm-short-grace" else _LONG_GRACE)
                out["grace"] = grace
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and _exited_into(pid, out):
                    time.sleep(0.0005)
            elif fault in _ArmFailpoint._FAILPOINTS or fault in (
                    "outage", "lease-lost"):
                if fault == "outage":
                    self._until(lambda: reached(step), pid, f"step {step}")
                    proxy.fail_all("503")
                elif fault == "lease-lost":
                    self._until(lambda: reached(step), pid, f"step {step}")
                    self.buckets[store].take_lease(location)
                # The job meets the error and stops by itself.
                deadline = time.monotonic() + self.timeout
                while time.monotonic() < deadline and _exited_into(pid, out):
                    time.sleep(0.002)
                if "exit" not in out:
                    out["hang"] = "the job did not stop on its error"
            else:  # a window of faults on the wire, then a kill
                self._until(lambda: reached(step), pid, f"step {step}")
                proxy.fail_all(fault)
                time.sleep(self.rng.uniform(0.05, 1.0))
                proxy.fail_all(None)
                after = step + self.rng.randrange(1, 4)
                self._until(lambda: reached(after) or _read(progress)[1], pid,
                            f"step {after}")
                time.sleep(self.rng.uniform(0.0, 0.012))
        except _Hang as e:
            code = out.get("exit", _exited(pid))
            if code is not None:
                out["exit"] = code
            # A job that stopped on a BackupWriteError where the fault was
            # meant to be ridden out (a short window of failing requests)
            # is counted apart; the restart is judged as for any other.
            if code != _STOPPED_ON_ERROR:
                out["hang"] = str(e)
        return out

    # Two JAX processes --------------------------------------------------

    def trial_two(self, store: str) -> dict[str, Any]:
        """A job of two JAX processes (one CPU device each, `DataParallel`,
        tests/multiprocess_worker.py's `crash-train`) saving after every
        batch; one process, drawn at random, is killed with `kill -9` after
        a random number of batches; the other is killed too unless it has
        stopped within 5 s (a supervisor restarts the whole job); both are
        started again at once (`crash-resume`)."""
        import subprocess

        from tests.conftest import follow_states, worker_env

        location, env = self._location(store)
        env = {**worker_env(), **env}
        record: dict[str, Any] = {"store": store, "fault": "kill9-one-of-two"}
        log = os.path.join(self.workdir, f"trial-{self._count}.log")
        record["log"] = log
        started = time.monotonic()
        procs = _two_processes("crash-train", location, env, log)
        # Each process's state digests, by (epoch, batch), in order.
        states, readers = follow_states(procs)
        batches = self.rng.randrange(2, 24)
        victim = self.rng.randrange(2)
        record.update(step=batches, victim=victim)
        deadline = time.monotonic() + self.timeout
        while (len(states[victim]) < batches and time.monotonic() < deadline
               and all(p.poll() is None for p in procs)):
            time.sleep(0.001)
        time.sleep(self.rng.uniform(0.0, 0.05))
        procs[victim].kill()
        other = procs[1 - victim]
        try:
            record["other_exit"] = other.wait(timeout=5)
        except subprocess.TimeoutExpired:
            other.kill()
        for p in procs:
            p.wait(timeout=self.timeout)
        for t in readers:
            t.join(timeout=self.timeout)
        record["progress"] = len(states[0])
        results = []
        for p in _two_processes("crash-resume", location, env, log):
            try:
                out, _ = p.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                results.append(None)
                continue
            lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
            results.append(json.loads(lines[-1][7:]) if lines else None)
        if any(r is None for r in results):
            record["restart_hang"] = "a resumed process gave no result"
        else:
            first = results[0]
            record["newest_step"] = first["newest_before"]
            restored = first["restored_from"] or None
            record["restored_from"] = restored
            record["left"] = first["left"]
            if restored:
                _, epoch, batch = restored
                record["differs"] = [
                    i for i, r in enumerate(results)
                    if r["restored_from"] != first["restored_from"]
                    or r["digest"] != states[i].get((epoch, batch))]
                order = list(states[0])
                if (epoch, batch) in order:
                    record["restored_step"] = order.index((epoch, batch)) + 1
        record["seconds"] = time.monotonic() - started
        record["layout"] = 2
        if store != "local":
            record["multipart_left"] = len(
                self.buckets[store].multipart_uploads())
        record["outcome"] = _outcome(record)
        if record["outcome"] == "ok":
            os.unlink(log)
            if store == "local":
                shutil.rmtree(location, ignore_errors=True)
        return record

    # Races ---------------------------------------------------------------

    def race(self, store: str) -> dict[str, Any]:
        """Two jobs start `fit` on one location at the same instant."""
        import select

        location, env = self._location(store)
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        outs = [os.path.join(self.workdir, f"race-{self._count}-{i}.json")
                for i in range(2)]
        pids = [_fork(child_racer, location, env, (ready_w, go_r), out,
                      log=out + ".log")
                for out in outs]
        os.close(ready_w)
        os.close(go_r)
        # Both have built their model and wait on the pipe: one write
        # releases both.
        ready = b""
        while len(ready) < 2 and select.select([ready_r], [], [],
                                               self.timeout)[0]:
            chunk = os.read(ready_r, 2)
            if not chunk:
                break  # a job died before it was ready: its result says so
            ready += chunk
        os.close(ready_r)
        os.write(go_w, b"xx")
        os.close(go_w)
        results = self._results(pids, outs, self.timeout)
        won = [r for r in results if r.get("won")]
        refused = [r for r in results if r.get("locked")
                   and r.get("batches_before_refusal") == 0]
        return {"store": store, "results": results,
                "ok": len(won) == 1 and len(refused) == 1}

    def fleet(self, store: str, jobs: int) -> dict[str, Any]:
        """`jobs` jobs with their own locations on one bucket at once."""
        pids, outs = [], []
        for _ in range(jobs):
            location, env = self._location(store)
            out = os.path.join(self.workdir, f"fleet-{self._count}.json")
            outs.append(out)
            pids.append(_fork(child_fleet, location, env, out, log=out + ".log"))
        results = self._results(pids, outs, self.timeout * 2)
        return {"store": store, "jobs": jobs, "results": results,
                "ok": all(r.get("restored_equal") for r in results)}

    def _results(self, pids: list[int], outs: list[str],
                 timeout: float) -> list[dict[str, Any]]:
        """Waits for forked jobs; returns the JSON result each wrote."""
        results = []
        for pid, out in zip(pids, outs):
            self._wait(pid, timeout)
            try:
                with open(out) as f:
                    results.append(json.load(f))
                os.unlink(out)
            except (OSError, ValueError) as e:
                results.append({"error": f"no result: {e}"})
        return results


def _two_processes(scenario: str, location: str, env: dict[str, str],
                   log: str) -> list[Any]:
    """Starts the two processes of a tests/multiprocess_worker.py job (one
    JAX coordination service on a free port); their stderr goes to `log`,
    their stdout is piped."""
    import subprocess

    from tests.conftest import free_port

    port = str(free_port())
    with open(log, "a") as err:
        return [subprocess.Popen(
            [sys.executable, _MULTI, scenario, location, str(i), port],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            for i in range(2)]


class _Hang(Exception):
    pass


def _exited_into(pid: int, out: dict[str, Any]) -> bool:
    """True while `pid` runs; once it has exited, records its status."""
    code = _exited(pid)
    if code is None:
        return True
    out["exit"] = code
    return False


def child_racer(location: str, env: dict[str, str], pipes: tuple[int, int],
                out_path: str) -> None:
    """One of two jobs racing for `location`: says it is ready on
    `pipes[0]`, waits for the start on `pipes[1]`, then trains."""
    result: dict[str, Any] = {"batches": 0}
    try:
        os.environ.update(env)
        job._child_setup()
        x, y = job._data()
        model = job._model()

        class Count(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                result["batches"] += 1
                # Long enough that the other job starts while this one runs.
                time.sleep(0.02)

        ready, go = pipes
        os.write(ready, b"r")
        os.read(go, 1)
        try:
            model.fit(x, y, epochs=job.EPOCHS, batch_size=job.BATCH,
                      shuffle=False, verbose=0, callbacks=[
                          fastbackup.BackupAndRestore(location, save_freq=1),
                          Count()])
            result["won"] = True
        except fastbackup.BackupDirLockedError as e:
            result["locked"] = str(e)
            result["batches_before_refusal"] = result["batches"]
    except BaseException:  # noqa: BLE001
        result["error"] = traceback.format_exc()[-3000:]
    finally:
        with open(out_path, "w") as f:
            json.dump(result, f)


def child_fleet(location: str, env: dict[str, str], out_path: str) -> None:
    result: dict[str, Any] = {}
    try:
        os.environ.update(env)
        job._child_setup()
        x, y = job._data()
        model = job._model()
        backup = fastbackup.BackupAndRestore(location, save_freq=1,
                                             delete_checkpoint=False)
        model.fit(x, y, epochs=job.EPOCHS, batch_size=job.BATCH,
                  shuffle=False, verbose=0, callbacks=[backup])
        backup.wait_until_finished()
        want = job._state(model)
        fresh = job._model()
        fresh.evaluate(x[:2], y[:2], verbose=0)
        again = fastbackup.BackupAndRestore(location, save_freq=1)
        again.set_model(fresh)
        again.on_train_begin()
        got = job._state(fresh)
        again.store.remove_all()
        again.store.release_lock(again)
        result["restored_equal"] = (
            want.keys() == got.keys()
            and all(want[k].tobytes() == got[k].tobytes() for k in want))
    except BaseException:  # noqa: BLE001
        result["error"] = traceback.format_exc()[-3000:]
    finally:
        with open(out_path, "w") as f:
            json.dump(result, f)


def _outcome(r: dict[str, Any]) -> str:
    if "unrestorable" in r:
        return "unrestorable"
    if r.get("differs"):
        return "inconsistent"
    newest = r.get("newest_step")
    restored = r.get("restored_from")
    if newest is not None and (restored is None or restored[0] != newest):
        return "lost"
    if ("error" in r or "crash" in r or "restart_hang" in r
            or r.get("left") or "hang" in r):
        return "person"
    return "ok"


# Report -----------------------------------------------------------------------


def _row(record: dict[str, Any]) -> str:
    """The table row of a trial: its store, and its layout if not one
    process."""
    if record.get("layout", 1) == 1:
        return record["store"]
    return f"{record['store']}, 2 JAX processes"


def summarize(campaign: Campaign, seconds: float) -> dict[str, Any]:
    records = campaign.records
    table: dict[str, Any] = {}
    for store in sorted({_row(r) for r in records}):
        mine = [r for r in records if _row(r) == store]
        # Trials without "restored_step" had nothing committed at the
        # fault and started afresh: no steps-lost figure.
        by_fault: dict[str, list[int]] = collections.defaultdict(list)
        for r in mine:
            if "restored_step" in r:
                by_fault[r["fault"]].append(r["progress"] - r["restored_step"])
        lost_steps = [n for v in by_fault.values() for n in v]
        table[store] = {
            "trials": len(mine),
            "faults": dict(collections.Counter(r["fault"] for r in mine)),
            **{o: sum(1 for r in mine if r["outcome"] == o) for o in OUTCOMES},
            "left_behind": sum(1 for r in mine if r.get("left")),
            # Jobs that stopped on their own error (BackupWriteError,
            # BackupDirLockedError), by fault: expected for the disk
            # failpoints, an outage and a lost lease.
            "stopped_on_error": dict(collections.Counter(
                r["fault"] for r in mine if r.get("exit") == _STOPPED_ON_ERROR)),
            "multipart_uploads_left": sum(r.get("multipart_left", 0)
                                          for r in mine),
            "median_steps_lost": (statistics.median(lost_steps)
                                  if lost_steps else None),
            "max_steps_lost": max(lost_steps) if lost_steps else None,
            "steps_lost_by_fault": {
                f: [statistics.median(v), max(v)]
                for f, v in sorted(by_fault.items())},
            "started_afresh": len(mine) - len(lost_steps),
            "seconds": sum(r["seconds"] for r in mine),
        }
    return {
        "seed": campaign.seed,
        "seconds": seconds,
        "stores": table,
        "races": {s: {"runs": sum(1 for r in campaign.races if r["store"] == s),
                      "exactly_one_won": sum(1 for r in campaign.races
                                             if r["store"] == s and r["ok"])}
                  for s in sorted({r["store"] for r in campaign.races})},
        "fleets": [{k: f[k] for k in ("store", "jobs", "ok")}
                   for f in campaign.fleets],
        "records": [
            {k: r.get(k) for k in ("store", "layout", "fault", "step",
                                   "progress", "restored_step", "outcome",
                                   "exit", "seconds")}
            for r in records],
        "failures": [r for r in records if r["outcome"] != "ok"][:30]
        + [r for r in campaign.races if not r["ok"]][:10]
        + [f for f in campaign.fleets if not f["ok"]],
    }


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        ("| Store | Trials | ok | lost | inconsistent | unrestorable | "
         "needed a person | left behind (objects/files; multipart uploads) | "
         "steps lost, median / max | faults |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for store, t in summary["stores"].items():
        faults = ", ".join(f"{k} {v}" for k, v in t["faults"].items())
        lines.append(
            f"| {store} | {t['trials']} | {t['ok']} | {t['lost']} | "
            f"{t['inconsistent']} | {t['unrestorable']} | {t['person']} | "
            f"{t['left_behind']}; {t['multipart_uploads_left']} | "
            f"{t['median_steps_lost']} / {t['max_steps_lost']} | {faults} |")
    for store, t in summary["stores"].items():
        by_fault = ", ".join(f"{k} {m:g} / {x}" for k, (m, x)
                             in t["steps_lost_by_fault"].items())
        lines.append(f"\nSteps lost on {store}, median / max by fault: "
                     f"{by_fault}; {t['started_afresh']} trial(s) had no "
                     "committed checkpoint at the fault and started afresh.")
    for store, r in summary["races"].items():
        lines.append(f"\nRaces on {store}: {r['exactly_one_won']} of "
                     f"{r['runs']} had exactly one winner and one refusal "
                     "before the first step.")
    for f in summary["fleets"]:
        lines.append(f"\n{f['jobs']} jobs at once on one {f['store']} bucket: "
                     f"{'all restored bitwise' if f['ok'] else 'FAILED'}.")
    return "\n".join(lines)


def _done(campaign: Campaign, record: dict[str, Any],
          log: Callable[[str], None]) -> None:
    """Keeps a judged trial; reports it if it was not ok."""
    campaign.records.append(record)
    if record["outcome"] != "ok":
        log(f"{_row(record)} trial {len(campaign.records)} {record['fault']}: "
            f"{record['outcome']}: " + json.dumps({k: record.get(k) for k in (
                "exit", "hang", "error", "crash", "unrestorable",
                "restart_hang", "left", "newest_step", "restored_from",
                "differs", "log")})[:1500])


def run(trials: int, stores: list[str], seed: int, workdir: str,
        races: int, jobs: int, faults: list[str] | None = None,
        layouts: tuple[int, ...] = (1,),
        log: Callable[[str], None] = print) -> dict:
    """Runs a campaign; returns its summary (see `summarize`).

    Args:
        trials: trials per store.
        stores: "local", "s3", "gs".
        seed: seeds the draws of faults, steps and delays.
        workdir: scratch directory (trial locations, logs).
        races: two-job races per store.
        jobs: jobs at once on one bucket, per bucket store (0: none).
        faults: the kinds to draw from (default: every kind), for one
            process.
        layouts: 1 (one process, every fault kind) and 2 (two JAX
            processes, one of them killed), `trials` each.
        log: where progress and each failed trial are reported.
    """
    os.makedirs(workdir, exist_ok=True)
    campaign = Campaign(workdir, seed)
    started = time.monotonic()
    try:
        campaign.reference()
        for store in stores:
            campaign.store(store)
            kinds = [f for f, where in FAULTS.items()
                     if store in where and (faults is None or f in faults)]
            if not kinds:
                log(f"{store}: none of the faults asked for applies")
            pending: dict[str, Any] | None = None
            for i in range(trials if kinds and 1 in layouts else 0):
                # Every kind once, in order, then drawn at random.
                fault = (kinds[i] if i < len(kinds)
                         else campaign.rng.choice(kinds))
                begun = campaign.trial(store, fault)
                # The previous trial's restart ran while this one trained.
                if pending is not None:
                    _done(campaign, campaign.finish(pending), log)
                pending = begun
            if pending is not None:
                _done(campaign, campaign.finish(pending), log)
            for _ in range(trials if 2 in layouts else 0):
                _done(campaign, campaign.trial_two(store), log)
            for _ in range(races):
                campaign.races.append(campaign.race(store))
            if store != "local" and jobs:
                campaign.fleets.append(campaign.fleet(store, jobs))
            log(f"{store}: {trials} trials done, "
                f"{time.monotonic() - started:.0f} s")
    finally:
        campaign.close()
    return summarize(campaign, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.chaos",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=100,
                        help="trials per store (default 100)")
    parser.add_argument("--stores", default="local,s3,gs",
                        help="comma-separated: local, s3, gs (default all)")
    parser.add_argument("--races", type=int, default=10,
                        help="two-job races per store (default 10)")
    parser.add_argument("--jobs", type=int, default=8,
                        help="jobs at once on one bucket, per bucket store "
                             "(default 8; 0: none)")
    parser.add_argument("--faults", default=None,
                        help="comma-separated fault kinds to draw from "
                             f"(default all): {', '.join(FAULTS)}")
    parser.add_argument("--layouts", default="1",
                        help="comma-separated: 1 (one process, every fault "
                             "kind), 2 (two JAX processes, one killed with "
                             "kill -9); --trials each (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None,
                        help="scratch directory (default: a new temporary one)")
    parser.add_argument("--out", default=None, help="write the JSON summary here")
    args = parser.parse_args(argv)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    for s in stores:
        if s not in ("local", "s3", "gs"):
            parser.error(f"unknown store {s!r}. Received: --stores="
                         f"{args.stores}. Expected: local, s3, gs")
    faults = list(FAULTS)
    if args.faults:
        faults = [f.strip() for f in args.faults.split(",") if f.strip()]
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            parser.error(f"unknown fault {unknown[0]!r}. Received: --faults="
                         f"{args.faults}. Expected some of: {', '.join(FAULTS)}")
    layouts = tuple(sorted({x.strip() for x in args.layouts.split(",")}))
    if not layouts or any(x not in ("1", "2") for x in layouts):
        parser.error(f"unknown layout. Received: --layouts={args.layouts}. "
                     "Expected 1, 2 or 1,2")
    import tempfile

    workdir = args.workdir or tempfile.mkdtemp(prefix="fastbackup-chaos-")
    summary = run(args.trials, stores, args.seed, workdir, args.races,
                  args.jobs, faults, tuple(int(x) for x in layouts))
    print(markdown(summary))
    print(f"\n{summary['seconds']:.0f} s, seed {args.seed}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    bad = (
        any(t[o] for t in summary["stores"].values()
            for o in OUTCOMES if o != "ok")
        or any(r["exactly_one_won"] != r["runs"]
               for r in summary["races"].values())
        or any(not f["ok"] for f in summary["fleets"]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
