"""In-process measurements: save cost (a), training loop (b), disk (c), restore (d).

Every section interleaves its configurations and repeats them in rounds,
rotating the order from one round to the next, so that the slow drifts of a
shared machine fall on every configuration alike; summaries are medians.
Between two timed operations the page cache is flushed (`os.sync`, untimed):
Keras's callback leaves its file's pages dirty, and their write-back would
otherwise be charged to whatever runs next.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from benchmarks.models import (
    ModelSpec,
    fresh_restore_target,
    make_data,
    state_arrays,
)

SaveFreq = int | str

# Raw write floor: the chunk each os.write() gets (the native writer uses
# 4 MiB chunks; larger ones only lower the syscall count further).
_RAW_CHUNK = 16 << 20


def median(values: Sequence[float]) -> float | None:
    """Median of `values`, `None` when there are none."""
    return statistics.median(values) if values else None


def rotated(items: Sequence[Any], round_index: int) -> list[Any]:
    """`items` rotated by `round_index`: each round starts elsewhere."""
    k = round_index % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


def settle() -> None:
    """Flushes dirty pages and garbage between two timed operations."""
    gc.collect()
    os.sync()
    time.sleep(0.05)


def orbax_available() -> bool:
    """True when `keras.callbacks.OrbaxCheckpoint` can be used."""
    try:
        return (
            importlib.util.find_spec("orbax") is not None
            and importlib.util.find_spec("orbax.checkpoint") is not None
            and hasattr(keras.callbacks, "OrbaxCheckpoint")
        )
    except (ImportError, ValueError):
        return False


def _fresh_dir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


def _close_writer(callback: Any) -> None:
    """Releases a fastbackup callback's host buffers and writer thread.

    `on_train_end` leaves the writer (and its state-sized buffer) alive for
    a later `fit`; the harness closes it so that one section's buffers do
    not stay resident during the next.
    """
    writer = getattr(callback, "_writer", None)
    if writer is not None:
        writer.close()


# ---------------------------------------------------------------------------
# a + c: the cost of one save on the training thread, and the disk.


class _CopyFloor:
    """`np.copyto` of the state into preallocated, already-touched buffers."""

    def __init__(self, model: keras.Model) -> None:
        self._model = model
        self._dst = [np.empty_like(a) for a in state_arrays(model)]
        self.run()  # touch every page once

    def run(self) -> float:
        src = state_arrays(self._model)
        start = time.perf_counter()
        for d, s in zip(self._dst, src):
            np.copyto(d, s)
        elapsed = time.perf_counter() - start
        del src
        return elapsed

    def close(self) -> None:
        self._dst = []


class _RawWriteFloor:
    """An `os.write` loop of N bytes, then `fsync`, in the backup directory."""

    def __init__(self, directory: str, nbytes: int) -> None:
        os.makedirs(directory, exist_ok=True)
        self._directory = directory
        self._buf = np.full(nbytes, 0x5A, dtype=np.uint8)
        self._count = 0

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes)

    def run(self) -> float:
        self._count += 1
        path = os.path.join(self._directory, f"raw-{self._count}.bin")
        view = memoryview(self._buf)
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            offset = 0
            while offset < len(view):
                offset += os.write(fd, view[offset : offset + _RAW_CHUNK])
            os.fsync(fd)
        finally:
            os.close(fd)
        elapsed = time.perf_counter() - start
        os.unlink(path)
        return elapsed

    def close(self) -> None:
        self._buf = np.empty(0, np.uint8)


def measure_saves(
    model: keras.Model, work_dir: str, rounds: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Sections a and c: one save's blocking time, and the durable writes.

    Interleaves, in each round: the memcpy floor, a fastbackup save (its
    blocking time, then the wait until durable), a Keras `BackupAndRestore`
    save (`save_weights` h5 + json: all blocking) and a raw write+fsync of
    the bytes fastbackup wrote. One untimed save of each warms up first;
    fastbackup's first save, which allocates its host buffers, is reported
    apart.

    Leaves one fastbackup checkpoint and one Keras backup of the same state
    behind, for `measure_restore`.

    Returns:
        Raw samples and medians; paths of the two backups under "files".
    """
    import fastbackup

    fb_dir = _fresh_dir(work_dir, "saves-fastbackup")
    keras_dir = _fresh_dir(work_dir, "saves-keras")
    fb = fastbackup.BackupAndRestore(fb_dir, delete_checkpoint=False)
    fb.set_model(model)
    fb.on_train_begin()
    kcb = keras.callbacks.BackupAndRestore(keras_dir, delete_checkpoint=False)
    kcb.set_model(model)

    samples: dict[str, list[float]] = {
        "floor_copy_s": [], "fastbackup_blocking_s": [], "fastbackup_durable_s": [],
        "fastbackup_write_s": [], "fastbackup_write_bps": [], "keras_save_s": [],
        "raw_write_s": [], "raw_write_bps": [],
    }

    def fastbackup_save(record: bool) -> None:
        before = fb.stats.bytes_written
        start = time.perf_counter()
        fb._save(0, 0, block=True)
        fb.wait_until_finished()
        durable = time.perf_counter() - start
        if record:
            written = fb.stats.bytes_written - before
            seconds = fb.stats.write_seconds[-1]
            samples["fastbackup_blocking_s"].append(fb.blocking_seconds[-1])
            samples["fastbackup_durable_s"].append(durable)
            samples["fastbackup_write_s"].append(seconds)
            samples["fastbackup_write_bps"].append(written / seconds)

    def keras_save() -> float:
        start = time.perf_counter()
        kcb._save_model()
        return time.perf_counter() - start

    # Warm-up, untimed except for the first-save figures.
    floor = _CopyFloor(model)
    fastbackup_save(record=False)
    first_blocking = fb.blocking_seconds[-1]
    first_keras = keras_save()
    settle()
    checkpoint_bytes = fb.stats.bytes_written
    raw = _RawWriteFloor(os.path.join(work_dir, "raw"), checkpoint_bytes)
    raw.run()
    settle()

    def run_raw() -> None:
        seconds = raw.run()
        samples["raw_write_s"].append(seconds)
        samples["raw_write_bps"].append(raw.nbytes / seconds)

    steps: dict[str, Callable[[], None]] = {
        "floor": lambda: samples["floor_copy_s"].append(floor.run()),
        "fastbackup": lambda: fastbackup_save(record=True),
        "keras": lambda: samples["keras_save_s"].append(keras_save()),
        "raw": run_raw,
    }
    for r in range(rounds):
        order = rotated(list(steps), r)
        log(f"  round {r + 1}/{rounds}: {', '.join(order)}")
        for name in order:
            steps[name]()
            settle()

    stats = fb.stats
    fb.on_train_end()
    _close_writer(fb)
    floor.close()
    raw.close()
    keras_file = os.path.join(keras_dir, "latest.weights.h5")
    return {
        "samples": samples,
        "first_save": {"fastbackup_blocking_s": first_blocking,
                       "keras_save_s": first_keras},
        "checkpoint_bytes": checkpoint_bytes,
        "keras_file_bytes": os.path.getsize(keras_file),
        "compression_ratio": stats.compression_ratio,
        "writer_throughput_bps": stats.throughput,
        "saves": stats.saves,
        "median": {k: median(v) for k, v in samples.items()},
        "files": {"fastbackup_dir": fb_dir, "keras_weights": keras_file},
    }


# ---------------------------------------------------------------------------
# b: the training loop.


class LoopTiming:
    """Times one `fit`'s training loop from two callbacks.

    `start` must be the first callback and `stop` the last: the loop runs
    from `start.on_train_begin` (before any other callback's) to
    `stop.on_train_end` (after every other callback's, so a callback that
    waits for its last write pays for it here). `fit`'s own set-up and
    tear-down, which on this machine sometimes pause for seconds, are
    outside.
    """

    def __init__(self) -> None:
        self.begin = 0.0
        self.end = 0.0
        self.batch_ends: list[float] = []
        timing = self

        class Start(keras.callbacks.Callback):
            def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
                timing.begin = time.perf_counter()

        class Stop(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
                timing.batch_ends.append(time.perf_counter())

            def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
                timing.end = time.perf_counter()

        self.start, self.stop = Start(), Stop()

    @property
    def loop_s(self) -> float:
        """on_train_begin to on_train_end."""
        return self.end - self.begin

    @property
    def steps_s(self) -> float:
        """on_train_begin to the last batch's end (no final flush)."""
        return self.batch_ends[-1] - self.begin

    @property
    def end_s(self) -> float:
        """The last batch's end to on_train_end (epoch-end saves, flushes)."""
        return self.end - self.batch_ends[-1]

    def step_times(self) -> list[float]:
        marks = [self.begin, *self.batch_ends]
        return [b - a for a, b in zip(marks[:-1], marks[1:])]


def _make_callback(tool: str, directory: str, save_freq: SaveFreq) -> keras.callbacks.Callback | None:
    if tool == "none":
        return None
    if tool == "fastbackup":
        import fastbackup

        return fastbackup.BackupAndRestore(directory, save_freq=save_freq)
    if tool == "keras":
        return keras.callbacks.BackupAndRestore(directory, save_freq=save_freq)
    if tool == "orbax":
        return keras.callbacks.OrbaxCheckpoint(directory, save_freq=save_freq)
    raise ValueError(f"unknown tool {tool!r}")


def loop_configurations(save_freqs: Sequence[SaveFreq], with_orbax: bool) -> list[tuple[str, SaveFreq | None]]:
    """The (tool, save_freq) pairs section b runs in each round."""
    configs: list[tuple[str, SaveFreq | None]] = [("none", None)]
    tools = ["keras", "fastbackup"] + (["orbax"] if with_orbax else [])
    for freq in save_freqs:
        configs += [(tool, freq) for tool in tools]
    return configs


def config_key(tool: str, save_freq: SaveFreq | None) -> str:
    """Stable name of a configuration, e.g. "fastbackup/5"."""
    return tool if save_freq is None else f"{tool}/{save_freq}"


def measure_training_loop(
    model: keras.Model,
    spec: ModelSpec,
    work_dir: str,
    rounds: int,
    save_freqs: Sequence[SaveFreq],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Section b: training-loop time with each callback, vs none.

    Every run trains the same (already traced) model for
    `spec.loop_steps` steps over `spec.loop_epochs` epochs, so
    `save_freq="epoch"` saves `loop_epochs` times. Overheads are given two
    ways: median loop time over median loop time without a callback, and
    the median over rounds of each round's own ratio (robust to drift).
    """
    x, y = make_data(spec, steps=spec.steps_per_epoch, seed=2)
    with_orbax = orbax_available()
    configs = loop_configurations(save_freqs, with_orbax)
    runs: dict[str, list[dict[str, Any]]] = {config_key(*c): [] for c in configs}
    for r in range(rounds):
        order = rotated(configs, r)
        log(f"  round {r + 1}/{rounds}")
        for tool, freq in order:
            key = config_key(tool, freq)
            directory = _fresh_dir(work_dir, f"loop-{tool}")
            callback = _make_callback(tool, directory, freq if freq is not None else "epoch")
            timing = LoopTiming()
            callbacks = [timing.start] + ([callback] if callback else []) + [timing.stop]
            model.fit(
                x, y, batch_size=spec.batch_size, epochs=spec.loop_epochs,
                shuffle=False, verbose=0, callbacks=callbacks,
            )
            run: dict[str, Any] = {
                "round": r,
                "loop_s": timing.loop_s,
                "steps_s": timing.steps_s,
                "end_s": timing.end_s,
                "median_step_s": median(timing.step_times()),
            }
            if tool == "fastbackup":
                stats = callback.stats  # type: ignore[union-attr]
                run.update(
                    saves=stats.saves,
                    coalesced=stats.coalesced,
                    median_blocking_s=median(callback.blocking_seconds),  # type: ignore[union-attr]
                    median_write_s=median(stats.write_seconds),
                )
                _close_writer(callback)
            runs[key].append(run)
            log(f"    {key:<18} loop {run['loop_s']:7.2f} s  "
                f"(steps {run['steps_s']:7.2f} s, end {run['end_s']:5.2f} s)")
            del callback
            shutil.rmtree(directory, ignore_errors=True)
            settle()

    base = [run["loop_s"] for run in runs["none"]]
    base_steps = [run["steps_s"] for run in runs["none"]]
    summary: dict[str, Any] = {}
    for key, items in runs.items():
        loop = [run["loop_s"] for run in items]
        steps = [run["steps_s"] for run in items]
        paired = [
            run["loop_s"] / runs["none"][i]["loop_s"] - 1.0
            for i, run in enumerate(items)
        ]
        summary[key] = {
            "median_loop_s": median(loop),
            "median_steps_s": median(steps),
            "median_end_s": median([run["end_s"] for run in items]),
            "median_step_s": median([run["median_step_s"] for run in items]),
            "overhead": median(loop) / median(base) - 1.0,  # type: ignore[operator]
            "overhead_paired": median(paired),
            "overhead_steps_only": median(steps) / median(base_steps) - 1.0,  # type: ignore[operator]
        }
        for extra in ("saves", "coalesced", "median_blocking_s", "median_write_s"):
            if items and extra in items[0]:
                summary[key][extra] = median([run[extra] for run in items])
    return {
        "steps": spec.loop_steps,
        "epochs": spec.loop_epochs,
        "save_freqs": list(save_freqs),
        "orbax": "installed" if with_orbax else "not installed",
        "runs": runs,
        "summary": summary,
    }


# ---------------------------------------------------------------------------
# d: restore.


def _weights_and_slots(model: keras.Model) -> list[Any]:
    # Metric variables are left out: a fresh model's compiled metrics are not
    # built yet, and neither restore fills them.
    return list(model.variables) + list(model.optimizer.variables)


def _states_equal(a: keras.Model, b: keras.Model) -> bool:
    left, right = _weights_and_slots(a), _weights_and_slots(b)
    return len(left) == len(right) and all(
        tuple(x.shape) == tuple(y.shape)
        and np.array_equal(np.asarray(x.numpy()), np.asarray(y.numpy()))
        for x, y in zip(left, right)
    )


def _zero_state(model: keras.Model) -> None:
    for v in _weights_and_slots(model):
        v.assign(np.zeros(tuple(v.shape), dtype=keras.backend.standardize_dtype(v.dtype)))


def measure_restore(
    source: keras.Model,
    spec: ModelSpec,
    files: dict[str, str],
    rounds: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Section d: `restore_latest` vs Keras `load_weights`, same state.

    Both load, into a fresh model of the same architecture (optimizer
    built), the backups `measure_saves` left of one and the same state; the
    files were just written, so both read from the page cache. Checks once
    that each restore reproduces the source model's state exactly.
    """
    from fastbackup.restore import restore_latest

    target = fresh_restore_target(spec)
    samples: dict[str, list[float]] = {"fastbackup_restore_s": [], "keras_load_s": []}

    def fastbackup_restore() -> float:
        start = time.perf_counter()
        reader = restore_latest(files["fastbackup_dir"], target, fall_back=False)
        elapsed = time.perf_counter() - start
        if reader is None:
            raise RuntimeError("no fastbackup checkpoint to restore")
        return elapsed

    def keras_load() -> float:
        start = time.perf_counter()
        target.load_weights(files["keras_weights"])
        return time.perf_counter() - start

    # Warm-up and correctness: each must reproduce the source state.
    fastbackup_restore()
    fastbackup_exact = _states_equal(source, target)
    _zero_state(target)
    keras_load()
    keras_exact = _states_equal(source, target)
    gc.collect()
    steps = {
        "fastbackup": lambda: samples["fastbackup_restore_s"].append(fastbackup_restore()),
        "keras": lambda: samples["keras_load_s"].append(keras_load()),
    }
    for r in range(rounds):
        order = rotated(list(steps), r)
        log(f"  round {r + 1}/{rounds}: {', '.join(order)}")
        for name in order:
            steps[name]()
            gc.collect()
    del target
    gc.collect()
    return {
        "samples": samples,
        "median": {k: median(v) for k, v in samples.items()},
        "exact": {"fastbackup": fastbackup_exact, "keras": keras_exact},
    }
