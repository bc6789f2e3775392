"""Crash harness: SIGKILL a training process at random moments, then restore.

Run by `tests/test_crash.py`, or by hand for long runs::

    python tests/crash_worker.py --kills 500 --seed 7 --workdir /tmp/crash \\
        --out /tmp/crash/summary.json

How it works. This process imports TensorFlow, Keras and fastbackup but never
runs a TensorFlow op; it is a "zygote" that forks every training and
verifying process, so each costs a model build instead of a 4 s import, and
20 kills fit in well under a minute on two cores.

1. A *reference* child trains the deterministic job once, uninterrupted,
   and records after every batch the full state that a checkpoint covers
   (every model, optimizer and metric variable) with its epoch and batch.
2. For each kill, a *training* child trains the same job from scratch into a
   new backup directory with `save_freq=1` and `delete_checkpoint=False`,
   and writes its progress (steps completed) to a file after every batch.
   The zygote picks a random step, waits until the child has completed it,
   waits a random 0-12 ms more and SIGKILLs it. Each kill uses one of three
   write modes: "native" (the real writer at full speed), "short" (every
   write(2) capped at 256 bytes by the native "short_write" failpoint, so
   the write loop advances over short writes) and "slow" (capped, and the
   writer pauses 2 ms between the buffers of a checkpoint; the zygote waits
   for the temporary file to appear and kills within 0-4 ms, so the kill
   lands while a checkpoint is half written).
3. A *verifying* child (a fresh process) builds a fresh model and restores
   through `BackupAndRestore.on_train_begin`, exactly as a resumed job
   would. It checks that the temporary files of the killed writer are gone
   and that the restored state is, bitwise, the reference state of the step
   the checkpoint names: weights, optimizer state, metrics, epoch and batch
   all from that same step.

The summary (JSON) counts kills, unloadable checkpoints (restore raised),
inconsistent ones (state not equal to the reference of its step), lost ones
(a checkpoint existed at the kill but nothing was restored) and the steps
lost per kill (steps completed at the kill minus the step restored).
"""

from __future__ import annotations

import argparse
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
import types
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fastbackup  # noqa: E402
from fastbackup._compat import native  # noqa: E402
from fastbackup.snapshot import collect_variables  # noqa: E402
from fastbackup.stores import local  # noqa: E402

SEED = 20240611
SAMPLES = 96
BATCH = 8
EPOCHS = 4
STEPS_PER_EPOCH = SAMPLES // BATCH
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS

# Per-kill write modes: native speed; every write(2) capped (short writes);
# capped and slowed between buffers (wide mid-write window).
MODES = ("native", "short", "slow")
SHORT_WRITE_BYTES = 256
SLOW_SECONDS_PER_BUFFER = 0.002


# Children ---------------------------------------------------------------------


def _child_setup() -> None:
    # One intra-op thread and deterministic kernels: the training children
    # must follow the reference run bit for bit.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(SEED)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 6)).astype("float32")
    y = (np.sin(x).sum(axis=1, keepdims=True)).astype("float32")
    return x, y


def _model() -> keras.Model:
    # No Dropout: its RNG would be state outside the comparison's concern.
    model = keras.Sequential(
        [
            keras.layers.Input((6,)),
            keras.layers.Dense(48, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(24, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def _state(model: keras.Model) -> dict[str, np.ndarray]:
    return {
        name: np.array(v.numpy(), copy=True)
        for name, v in collect_variables(model)
    }


class _Progress(keras.callbacks.Callback):
    """Writes the number of steps completed to a file after every batch."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.epoch * STEPS_PER_EPOCH + batch + 1
        os.pwrite(self.fd, struct.pack("<q", step), 0)


class _Recorder(keras.callbacks.Callback):
    """Records the full state after every batch (reference run)."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.states: dict[str, np.ndarray] = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        for name, value in _state(self.model).items():
            self.states[f"{self.epoch}:{batch}:{name}"] = value


class _SlowAtomicFile:
    """The real native AtomicFile, one buffer per write() call, with a pause
    between buffers: the temporary file stays half written for longer."""

    def __init__(self, real, directory, name, sync=True, direct=False):
        self._f = real.AtomicFile(directory, name, sync=sync, direct=direct)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def write(self, buffers, checksum=True):
        crcs: list[int] = []
        for buf in buffers:
            crcs += self._f.write([buf], checksum=checksum)
            time.sleep(SLOW_SECONDS_PER_BUFFER)
        return crcs

    @property
    def bytes_written(self):
        return self._f.bytes_written

    def commit(self):
        self._f.commit()


def _apply_write_mode(mode: str) -> None:
    # CRASH_WORKER_SHORT_WRITE lets a hand-run worker force short writes.
    cap = os.environ.get("CRASH_WORKER_SHORT_WRITE")
    if mode in ("short", "slow") or cap:
        native.set_failpoint("short_write", int(cap or SHORT_WRITE_BYTES), 0)
    if mode == "slow":
        real = native
        local.native = types.SimpleNamespace(
            AtomicFile=lambda d, n, sync=True, direct=False: _SlowAtomicFile(
                real, d, n, sync, direct)
        )


def child_reference(out_path: str, backup_dir: str) -> None:
    _child_setup()
    x, y = _data()
    model = _model()
    recorder = _Recorder()
    cb = fastbackup.BackupAndRestore(backup_dir, save_freq=1,
                                     delete_checkpoint=False)
    start = time.perf_counter()
    model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False,
              verbose=0, callbacks=[recorder, cb])
    cb.wait_until_finished()
    seconds = time.perf_counter() - start
    np.savez(out_path, **recorder.states)
    with open(out_path + ".json", "w") as f:
        json.dump({"seconds": seconds, "steps": TOTAL_STEPS}, f)


def child_train(backup_dir: str, progress_path: str, mode: str) -> None:
    _child_setup()
    _apply_write_mode(mode)
    x, y = _data()
    model = _model()
    # Progress first: at a kill, the file never claims less than what the
    # checkpoint could hold.
    callbacks = [
        _Progress(progress_path),
        fastbackup.BackupAndRestore(backup_dir, save_freq=1,
                                    delete_checkpoint=False),
    ]
    model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False,
              verbose=0, callbacks=callbacks)
    callbacks[1].wait_until_finished()
    os.pwrite(callbacks[0].fd, struct.pack("<q", -1), 8)  # "finished"
    while True:  # wait for the SIGKILL
        time.sleep(1)


def differences(state: dict[str, np.ndarray], ref: Any,
                at: tuple[int, int]) -> list[str]:
    """The variables of `state` that are not, bitwise (dtype and shape
    included), the reference run's after batch `at` = (epoch, batch);
    `ref` is the reference's `np.load`."""
    differs = []
    for name, value in state.items():
        key = f"{at[0]}:{at[1]}:{name}"
        if key not in ref.files:
            differs.append(f"{name}: no reference state at {at[0]}:{at[1]}")
            continue
        want = ref[key]
        if (want.dtype != value.dtype or want.shape != value.shape
                or want.tobytes() != value.tobytes()):
            differs.append(name)
    if len(state) != len({k.split(":", 2)[2] for k in ref.files}):
        differs.append("variable count differs from the reference")
    return differs


def child_verify(backup_dir: str, ref_path: str, out_path: str) -> None:
    result: dict = {}
    try:
        _child_setup()
        names = os.listdir(backup_dir)
        result["temp_before"] = sorted(n for n in names if n.endswith(".tmp"))
        result["checkpoints"] = sorted(n for n in names if n.endswith(".fbk"))
        x, y = _data()
        model = _model()
        # Build the compiled metrics (TensorFlow builds them at the first
        # traced step) without touching weights or optimizer.
        model.evaluate(x[:2], y[:2], verbose=0)
        cb = fastbackup.BackupAndRestore(backup_dir, save_freq=1,
                                         delete_checkpoint=False)
        cb.set_model(model)
        try:
            cb.on_train_begin()
        except Exception as e:  # counted as unloadable
            result["error"] = f"{type(e).__name__}: {e}"
            return
        result["temp_after"] = sorted(
            n for n in os.listdir(backup_dir) if n.endswith(".tmp"))
        result["restored_from"] = cb.restored_from
        if cb.restored_from is None:
            return
        _, epoch, batch = cb.restored_from
        # A batch-level checkpoint (E, b) holds the state after batch b of
        # epoch E. The one exception is the save made at the end of `fit`
        # (a save that fell due while the writer was busy): like Keras's
        # epoch-level saves it records (EPOCHS, 0), "before epoch EPOCHS",
        # and holds the state after the last batch.
        if (epoch, batch) == (EPOCHS, 0):
            ref_key, step = (EPOCHS - 1, STEPS_PER_EPOCH - 1), TOTAL_STEPS
        else:
            ref_key, step = (epoch, batch), epoch * STEPS_PER_EPOCH + batch + 1
        result["restored_step"] = step
        result["differs"] = differences(_state(model), np.load(ref_path),
                                        ref_key)
        result["iterations"] = int(model.optimizer.iterations.numpy())
    except BaseException:
        result["crash"] = traceback.format_exc()
    finally:
        with open(out_path, "w") as f:
            json.dump(result, f)


# The zygote -------------------------------------------------------------------


def _fork(target, *args) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            target(*args)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _read_progress(path: str) -> tuple[int, bool]:
    try:
        with open(path, "rb") as f:
            data = f.read(16)
    except FileNotFoundError:
        return 0, False
    step = struct.unpack("<q", data[:8])[0] if len(data) >= 8 else 0
    finished = len(data) >= 16 and struct.unpack("<q", data[8:16])[0] == -1
    return step, finished


def _has_checkpoint(directory: str) -> bool:
    try:
        return any(n.endswith(".fbk") for n in os.listdir(directory))
    except FileNotFoundError:
        return False


def run(kills: int, seed: int, workdir: str, timeout: float = 120.0) -> dict:
    rng = random.Random(seed)
    os.makedirs(workdir, exist_ok=True)
    ref_path = os.path.join(workdir, "reference.npz")
    problems: list[str] = []

    pid = _fork(child_reference, ref_path, os.path.join(workdir, "ref-backup"))
    if _wait(pid, timeout) != 0:
        raise RuntimeError("the reference run failed")
    shutil.rmtree(os.path.join(workdir, "ref-backup"), ignore_errors=True)

    def train_and_kill(index: int, mode: str, target: int | None,
                       delay: float = 0.0) -> dict:
        backup = os.path.join(workdir, f"run-{index}")
        progress = os.path.join(workdir, f"progress-{index}")
        record: dict = {"index": index, "mode": mode, "backup": backup}
        pid = _fork(child_train, backup, progress, mode)
        # Start the clock once the first checkpoint is durable.
        deadline = time.monotonic() + timeout
        while not _has_checkpoint(backup):
            if time.monotonic() > deadline or os.waitpid(pid, os.WNOHANG)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                record["hang"] = "no checkpoint appeared"
                return record
            time.sleep(0.001)
        if target is None:  # run to completion, then kill
            while not _read_progress(progress)[1]:
                if time.monotonic() > deadline:
                    record["hang"] = "did not finish"
                    break
                time.sleep(0.002)
        else:
            # The kill lands `delay` seconds after step `target` completed:
            # anywhere in the run whatever the machine's load, and anywhere
            # within a step (snapshot, training, or the writer mid-file).
            while _read_progress(progress)[0] < target:
                if time.monotonic() > deadline:
                    record["hang"] = "did not reach its kill step"
                    break
                time.sleep(0.0005)
            if mode == "slow":
                # Aimed at the writer: wait for its temporary file, then kill
                # within the next few buffers.
                while not any(n.endswith(".tmp") for n in os.listdir(backup)):
                    if time.monotonic() > deadline:
                        record["hang"] = "no temporary file appeared"
                        break
                    time.sleep(0.0002)
            time.sleep(delay)
        record["target"] = target
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        record["progress"], record["finished"] = _read_progress(progress)
        os.unlink(progress)
        return record

    def start_verify(record: dict) -> int | None:
        if "hang" in record:
            return None
        out = os.path.join(workdir, f"verify-{record['index']}.json")
        return _fork(child_verify, record["backup"], ref_path, out)

    def finish_verify(record: dict, vpid: int | None) -> dict:
        if vpid is None:
            return record
        if _wait(vpid, timeout) is None:
            record["hang"] = "verifier timed out"
            return record
        out = os.path.join(workdir, f"verify-{record['index']}.json")
        with open(out) as f:
            record.update(json.load(f))
        os.unlink(out)
        shutil.rmtree(record.pop("backup"), ignore_errors=True)
        return record

    # Calibration: one uninterrupted run, which must also restore exactly
    # the reference's final state (the determinism check).
    calib = train_and_kill(-1, "native", None)
    calib = finish_verify(calib, start_verify(calib))
    if calib.get("restored_step") != TOTAL_STEPS or calib.get("differs") != []:
        problems.append(f"calibration run does not match reference: {calib}")

    records = []
    pending: tuple[dict, int | None] | None = None
    started = time.perf_counter()
    for i in range(kills):
        mode = MODES[i % len(MODES)] if i < len(MODES) else rng.choice(MODES)
        delay = rng.uniform(0.0, 0.004 if mode == "slow" else 0.012)
        record = train_and_kill(i, mode, rng.randrange(1, TOTAL_STEPS), delay)
        # The previous kill's verifier ran while this child trained.
        if pending is not None:
            records.append(finish_verify(*pending))
        pending = (record, start_verify(record))
    if pending is not None:
        records.append(finish_verify(*pending))
    elapsed = time.perf_counter() - started

    unloadable = [r for r in records if "error" in r or "crash" in r]
    inconsistent = [r for r in records if r.get("differs")]
    lost = [r for r in records
            if "error" not in r and "crash" not in r and "hang" not in r
            and r.get("restored_from") is None]
    hangs = [r for r in records if "hang" in r]
    temps_left = [r for r in records if r.get("temp_after")]
    mid_write = [r for r in records if r.get("temp_before")]
    future = [r for r in records
              if r.get("restored_step", 0) > r.get("progress", 0)]
    steps_lost = [r["progress"] - r["restored_step"] for r in records
                  if "restored_step" in r]
    summary = {
        "seed": seed,
        "kills": len(records),
        "unloadable": len(unloadable),
        "inconsistent": len(inconsistent),
        "lost": len(lost),
        "hangs": len(hangs),
        "temp_files_left_after_restore": len(temps_left),
        "killed_mid_write": len(mid_write),
        "killed_after_finish": sum(1 for r in records if r.get("finished")),
        "restored_from_future": len(future),
        "modes": {
            m: {
                "kills": sum(1 for r in records if r["mode"] == m),
                "killed_mid_write": sum(
                    1 for r in mid_write if r["mode"] == m),
                "median_steps_lost": statistics.median(
                    [r["progress"] - r["restored_step"] for r in records
                     if r["mode"] == m and "restored_step" in r] or [0]),
            }
            for m in MODES
        },
        "median_steps_lost": statistics.median(steps_lost) if steps_lost else None,
        "max_steps_lost": max(steps_lost) if steps_lost else None,
        "steps_lost_histogram": {
            str(k): steps_lost.count(k) for k in sorted(set(steps_lost))
        },
        "total_steps": TOTAL_STEPS,
        "kill_loop_seconds": elapsed,
        "problems": problems,
        "records": [
            {k: r.get(k) for k in ("mode", "target", "progress",
                                   "restored_step", "temp_before")}
            for r in records
        ],
        "failures": [r for r in records
                     if r in unloadable or r in inconsistent or r in lost
                     or r in hangs or r in temps_left or r in future][:20],
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Read here and removed: fastbackup refuses unknown FASTBACKUP_* names.
    default_kills = int(os.environ.pop("FASTBACKUP_CRASH_KILLS", 20))
    parser.add_argument("--kills", type=int, default=default_kills)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    summary = run(args.kills, args.seed, args.workdir)
    line = (
        f"kills={summary['kills']} unloadable={summary['unloadable']} "
        f"inconsistent={summary['inconsistent']} lost={summary['lost']} "
        f"hangs={summary['hangs']} median_steps_lost="
        f"{summary['median_steps_lost']} max_steps_lost="
        f"{summary['max_steps_lost']} killed_mid_write="
        f"{summary['killed_mid_write']} temp_files_left="
        f"{summary['temp_files_left_after_restore']} "
        f"loop={summary['kill_loop_seconds']:.1f}s"
    )
    print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
