"""In-process measurements: save cost (a), training loop (b), disk (c), restore (d).

Every section interleaves its configurations and repeats them in rounds,
in a different (seeded) order each round, so that the slow drifts of a
shared machine fall on every configuration alike; summaries are medians.
Between two timed operations (untimed) dirty pages are written back and the
harness's files dropped from the page cache (`settle`): Keras's callback
leaves 1.2 GB of dirty pages, and on this class of VM both their write-back
and their mere presence in the cache slow whatever runs next several-fold.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import os
import random
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
    fit_inputs,
    make_data,
    state_arrays,
)

SaveFreq = int | str
# Section b's name for fastbackup with FASTBACKUP_OVERLAP=on.
OVERLAP_TOOL = "fastbackup+overlap"

# Raw write floor: the chunk each os.write() gets (the native writer uses
# 4 MiB chunks; larger ones only lower the syscall count further).
_RAW_CHUNK = 16 << 20


def median(values: Sequence[float]) -> float | None:
    """Median of `values`, `None` when there are none."""
    return statistics.median(values) if values else None


def round_order(items: Sequence[Any], round_index: int) -> list[Any]:
    """The order of `items` in one round: a fixed-seed permutation.

    A rotation would keep every item behind the same predecessor in every
    round; what an operation leaves behind (dirty or cached pages, freed
    memory) changes the next one's time, so predecessors must vary too.
    """
    if len(items) <= 4:
        # Few items: walk through all their permutations (seeded order), so
        # that two items alternate and four get every predecessor.
        perms = [list(p) for p in itertools.permutations(items)]
        random.Random(0).shuffle(perms)
        return perms[round_index % len(perms)]
    order = list(items)
    random.Random(round_index).shuffle(order)
    return order


def evict(*paths: str) -> None:
    """Drops the page-cache pages of the files under `paths` (after a sync).

    A file just written leaves its pages cached, and on this class of VM
    the next large write is several times slower while they are (measured:
    a 1.2 GB `os.write` loop takes 0.3 s normally, 1.4-3.1 s right after
    Keras's 1.2 GB h5 save, 0.3-1.0 s once the h5's pages are dropped).
    """
    for root in paths:
        for folder, _, names in os.walk(root):
            for name in names:
                try:
                    fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def settle(*paths: str) -> None:
    """Between two timed operations: garbage, dirty pages, cached files.

    Collects garbage, writes every dirty page back (`os.sync`) and drops
    the cached pages of the files under `paths`, so that each operation
    starts from the same state whatever ran before it.
    """
    gc.collect()
    os.sync()
    evict(*paths)
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


def timed_orbax(directory: str, save_freq: SaveFreq) -> keras.callbacks.Callback:
    """A `keras.callbacks.OrbaxCheckpoint` that times what each save blocks.

    Its `blocking_seconds` lists, per save, the time the training thread
    spends in the callback's save (collecting the state, handing it to
    Orbax's asynchronous save); the rest of the write runs in Orbax's
    background threads.
    """

    class TimedOrbaxCheckpoint(keras.callbacks.OrbaxCheckpoint):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.blocking_seconds: list[float] = []

        def _save_checkpoint(self, step: int, logs: Any = None) -> None:
            start = time.perf_counter()
            super()._save_checkpoint(step, logs)
            self.blocking_seconds.append(time.perf_counter() - start)

    return TimedOrbaxCheckpoint(directory, save_freq=save_freq)


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
    """`np.copyto` of the state into preallocated, already-touched buffers.

    Variable by variable from the backend's host views (`run`), and in one
    call over a buffer of the state's size (`run_flat`): glibc's `memcpy`
    streams past the cache only above a threshold derived from the
    last-level cache size, so on a VM that reports a large one the first is
    up to 1.7x the second (docs/benchmarks.md).
    """

    def __init__(self, model: keras.Model) -> None:
        self._model = model
        self._dst = [np.empty_like(a) for a in state_arrays(model)]
        nbytes = sum(d.nbytes for d in self._dst)
        self._flat_src = np.ones(nbytes, np.uint8)
        self._flat_dst = np.zeros(nbytes, np.uint8)
        self.run()  # touch every page once
        self.run_flat()

    def run_flat(self) -> float:
        """Returns the seconds of one `np.copyto` of the state's bytes."""
        start = time.perf_counter()
        np.copyto(self._flat_dst, self._flat_src)
        return time.perf_counter() - start

    def run(self) -> tuple[float, float]:
        """Returns (seconds to get the variables' host views, seconds to copy)."""
        start = time.perf_counter()
        src = state_arrays(self._model)
        copy_start = time.perf_counter()
        for d, s in zip(self._dst, src):
            np.copyto(d, s)
        end = time.perf_counter()
        del src
        return copy_start - start, end - copy_start

    def close(self) -> None:
        self._dst = []
        self._flat_src = self._flat_dst = np.empty(0, np.uint8)


class _RawWriteFloor:
    """An `os.write` loop of N bytes, then `fsync`, in the backup directory."""

    def __init__(self, directory: str, nbytes: int) -> None:
        os.makedirs(directory, exist_ok=True)
        self._directory = directory
        # Incompressible bytes, in case the storage under the VM compresses.
        self._buf = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        self._count = 0

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes)

    def run(self) -> tuple[float, float]:
        """Returns (seconds in the write loop, seconds in fsync and close)."""
        self._count += 1
        path = os.path.join(self._directory, f"raw-{self._count}.bin")
        view = memoryview(self._buf)
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            offset = 0
            while offset < len(view):
                offset += os.write(fd, view[offset : offset + _RAW_CHUNK])
            written = time.perf_counter()
            os.fsync(fd)
        finally:
            os.close(fd)
        end = time.perf_counter()
        os.unlink(path)
        return written - start, end - written

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
    with_orbax = orbax_available()
    orbax_dir = _fresh_dir(work_dir, "saves-orbax")
    ocb: Any = None
    if with_orbax:
        ocb = timed_orbax(orbax_dir, save_freq=1)
        ocb.set_model(model)
    orbax_steps = itertools.count()

    samples: dict[str, list[float]] = {
        name: []
        for name in (
            "floor_copy_s", "floor_views_s", "floor_flat_copy_s",
            "fastbackup_blocking_s",
            "fastbackup_durable_s", "fastbackup_write_s", "fastbackup_write_bps",
            "keras_save_s", "raw_write_s", "raw_write_loop_s", "raw_write_bps",
            "orbax_blocking_s", "orbax_durable_s",
        )
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

    def orbax_save(record: bool) -> None:
        start = time.perf_counter()
        ocb._save_checkpoint(next(orbax_steps))
        blocking = ocb.blocking_seconds[-1]
        ocb.wait_until_finished()
        if record:
            samples["orbax_blocking_s"].append(blocking)
            samples["orbax_durable_s"].append(time.perf_counter() - start)

    # Warm-up, untimed except for the first-save figures.
    floor = _CopyFloor(model)
    first_orbax = None
    if with_orbax:
        orbax_save(record=False)
        first_orbax = ocb.blocking_seconds[-1]
    fastbackup_save(record=False)
    first_blocking = fb.blocking_seconds[-1]
    first_keras = keras_save()
    settle(fb_dir, keras_dir)
    checkpoint_bytes = fb.stats.bytes_written
    raw = _RawWriteFloor(os.path.join(work_dir, "raw"), checkpoint_bytes)
    raw.run()
    settle(fb_dir, keras_dir)

    def run_raw() -> None:
        write, sync = raw.run()
        samples["raw_write_s"].append(write + sync)
        samples["raw_write_loop_s"].append(write)
        samples["raw_write_bps"].append(raw.nbytes / (write + sync))

    def run_floor() -> None:
        views, copy = floor.run()
        samples["floor_views_s"].append(views)
        samples["floor_copy_s"].append(copy)
        samples["floor_flat_copy_s"].append(floor.run_flat())

    steps: dict[str, Callable[[], None]] = {
        "floor": run_floor,
        "fastbackup": lambda: fastbackup_save(record=True),
        "keras": lambda: samples["keras_save_s"].append(keras_save()),
        "raw": run_raw,
    }
    if with_orbax:
        steps["orbax"] = lambda: orbax_save(record=True)
    orders: list[list[str]] = []
    for r in range(rounds):
        order = round_order(list(steps), r)
        log(f"  round {r + 1}/{rounds}: {', '.join(order)}")
        orders.append(order)
        for name in order:
            steps[name]()
            settle(fb_dir, keras_dir, orbax_dir)

    stats = fb.stats
    if ocb is not None:
        ocb.on_train_end()
    fb.on_train_end()
    _close_writer(fb)
    floor.close()
    raw.close()
    keras_file = os.path.join(keras_dir, "latest.weights.h5")
    return {
        "samples": samples,
        "orders": orders,
        "first_save": {"fastbackup_blocking_s": first_blocking,
                       "keras_save_s": first_keras,
                       "orbax_blocking_s": first_orbax},
        "orbax": "installed" if with_orbax else "not installed",
        "checkpoint_bytes": checkpoint_bytes,
        "keras_file_bytes": os.path.getsize(keras_file),
        "compression_ratio": stats.compression_ratio,
        "writer_throughput_bps": stats.throughput,
        "saves": stats.saves,
        "median": {k: median(v) for k, v in samples.items()},
        "files": {"fastbackup_dir": fb_dir, "keras_weights": keras_file},
    }


# ---------------------------------------------------------------------------
# c: the writer thread's CPU per GB written, by write path.

# The write paths compared: (name, snapshot kind, O_DIRECT).
WRITE_PATHS = (
    # Before format version 2: O_DIRECT through the extension's bounce
    # buffer, which is what any snapshot buffer off a page boundary gets.
    ("bounce", "unaligned", True),
    # Page-aligned snapshot buffers written from where they are.
    ("zero-copy", "aligned", True),
    ("zero-copy, no THP", "aligned-small-pages", True),
    # Reference: the page cache (FASTBACKUP_DIRECT_IO=off).
    ("buffered", "aligned", False),
)


def _unaligned_snapshot(aligned: Any) -> Any:
    """Ordinary numpy copies of a snapshot, each 64 bytes off a page."""
    from fastbackup.snapshot import HostSnapshot

    arrays = []
    for array in aligned.arrays:
        backing = np.empty(array.nbytes + 8192, np.uint8)
        start = (-backing.ctypes.data) % 4096 + 64
        copy = backing[start : start + array.nbytes].view(array.dtype)
        copy = copy.reshape(array.shape)
        np.copyto(copy, array)
        arrays.append(copy)
    # The same checksums as the aligned snapshot's copy took: the paths
    # compared differ in the bounce copy alone.
    snap = HostSnapshot(list(aligned.specs), arrays, crcs=list(aligned.crcs))
    snap.epoch, snap.batch, snap.taken_at = aligned.epoch, aligned.batch, aligned.taken_at
    return snap


def measure_writer_cpu(
    model: keras.Model, work_dir: str, rounds: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Section c: the writer thread's CPU time per GB written, per path.

    Runs what the writer thread runs for one checkpoint (`format.encode`,
    `LocalStore.commit` with fsync) on this thread, and takes this thread's
    CPU time (user + system, `time.thread_time`) around it: any bounce or
    page-cache copy, and the kernel's work for the write(2)s. The raw
    tensors' CRC-32C came with the snapshot's copy (`HostSnapshot.crcs`),
    on every path alike; the header's and padding's are computed here.
    Waiting for the disk is not CPU. Compression is off, so that every
    path writes the same raw bytes. The paths are `WRITE_PATHS`, in
    interleaved rounds; fault-in time of fresh snapshot buffers, with and
    without transparent huge pages, is recorded too.

    Returns:
        Samples and medians per path: `cpu_s_per_gb`, `wall_s`, `bytes`.
    """
    from fastbackup import format as fmt
    from fastbackup.stores.local import LocalStore
    from fastbackup.snapshot import HostSnapshot, Snapshotter

    snapper = Snapshotter(model)
    specs = snapper.layout()
    snapshots: dict[str, Any] = {}
    fault_in: dict[str, float] = {}
    for kind, huge in (("aligned", True), ("aligned-small-pages", False)):
        start = time.perf_counter()
        snapshots[kind] = HostSnapshot.allocate(specs, huge_pages=huge)
        fault_in[kind] = time.perf_counter() - start
        snapper.take(snapshots[kind], 0, 0)
    snapshots["unaligned"] = _unaligned_snapshot(snapshots["aligned"])
    policy = fmt.CompressionPolicy(None)
    directory = _fresh_dir(work_dir, "writer-cpu")
    os.makedirs(directory)
    samples: dict[str, dict[str, list[float]]] = {
        name: {"cpu_s_per_gb": [], "wall_s": [], "bytes": []}
        for name, _, _ in WRITE_PATHS
    }
    step = itertools.count()

    def write(name: str, kind: str, direct: bool, record: bool) -> None:
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        encoded = fmt.encode(snapshots[kind], policy, next(step))
        result = LocalStore(directory).commit(encoded.meta["step"], encoded,
                                sync=True, direct=direct)
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
        LocalStore(directory).prune(1)
        if record:
            s = samples[name]
            s["cpu_s_per_gb"].append(cpu / (result.nbytes / 1e9))
            s["wall_s"].append(wall)
            s["bytes"].append(result.nbytes)

    for name, kind, direct in WRITE_PATHS:  # warm-up, untimed
        write(name, kind, direct, record=False)
        settle(directory)
    orders = []
    for r in range(rounds):
        order = round_order(list(WRITE_PATHS), r)
        orders.append([p[0] for p in order])
        for name, kind, direct in order:
            write(name, kind, direct, record=True)
            settle(directory)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {samples[n]['cpu_s_per_gb'][-1]:.3f}" for n, _, _ in order)
            + " CPU s/GB")
    shutil.rmtree(directory, ignore_errors=True)
    snapshots.clear()
    medians = {name: {k: median(v) for k, v in s.items()} for name, s in samples.items()}
    return {
        "paths": [list(p) for p in WRITE_PATHS],
        "samples": samples,
        "orders": orders,
        "median": medians,
        "fault_in_s": fault_in,
        "state_bytes": sum(s.nbytes for s in specs),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------------------
# b: the training loop.


def _process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class LoopTiming:
    """Times one `fit`'s training loop (wall and process CPU) from two callbacks.

    `start` must be the first callback and `stop` the last: the loop runs
    from `start.on_train_begin` (before any other callback's) to
    `stop.on_train_end` (after every other callback's, so a callback that
    waits for its last write pays for it here). `fit`'s own set-up and
    tear-down, which on this machine sometimes pause for seconds, are
    outside. The process's CPU time over the same span (every thread,
    the background writer's included) is recorded too: other tenants of a
    shared machine stretch wall time far more than it.
    """

    def __init__(self) -> None:
        self.begin = 0.0
        self.end = 0.0
        self.cpu_begin = 0.0
        self.cpu_end = 0.0
        self.batch_ends: list[float] = []
        timing = self

        class Start(keras.callbacks.Callback):
            def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
                timing.cpu_begin = _process_cpu_s()
                timing.begin = time.perf_counter()

        class Stop(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
                timing.batch_ends.append(time.perf_counter())

            def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
                timing.end = time.perf_counter()
                timing.cpu_end = _process_cpu_s()

        self.start, self.stop = Start(), Stop()

    @property
    def loop_s(self) -> float:
        """on_train_begin to on_train_end."""
        return self.end - self.begin

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the whole process (all threads) during the loop."""
        return self.cpu_end - self.cpu_begin

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


def _writer_counts(callback: Any) -> tuple[int, int, int]:
    """(saves, coalesced, writes timed) so far, to take per-run differences."""
    stats = callback.stats
    return stats.saves, stats.coalesced, len(stats.write_seconds)


def _make_callback(
    tool: str, directory: str, save_freq: SaveFreq
) -> keras.callbacks.Callback | None:
    if tool == "none":
        return None
    if tool in ("fastbackup", OVERLAP_TOOL):
        import fastbackup

        # The callback reads FASTBACKUP_* once, when it is constructed.
        setting = "on" if tool == OVERLAP_TOOL else "off"
        saved = os.environ.get("FASTBACKUP_OVERLAP")
        os.environ["FASTBACKUP_OVERLAP"] = setting
        try:
            return fastbackup.BackupAndRestore(directory, save_freq=save_freq)
        finally:
            if saved is None:
                del os.environ["FASTBACKUP_OVERLAP"]
            else:
                os.environ["FASTBACKUP_OVERLAP"] = saved
    if tool == "keras":
        return keras.callbacks.BackupAndRestore(directory, save_freq=save_freq)
    if tool == "orbax":
        return timed_orbax(directory, save_freq)
    raise ValueError(f"unknown tool {tool!r}")


def loop_configurations(
    save_freqs: Sequence[SaveFreq], with_orbax: bool
) -> list[tuple[str, SaveFreq | None]]:
    """The (tool, save_freq) pairs section b runs in each round."""
    configs: list[tuple[str, SaveFreq | None]] = [("none", None)]
    tools = ["keras", "fastbackup"] + (["orbax"] if with_orbax else [])
    for freq in save_freqs:
        configs += [(tool, freq) for tool in tools]
        if isinstance(freq, int):
            # Only batch-level saves overlap (epoch-end saves stay
            # synchronous); measured beside the default, same rounds.
            configs.append((OVERLAP_TOOL, freq))
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
    inputs = fit_inputs(spec, x, y)
    with_orbax = orbax_available()
    configs = loop_configurations(save_freqs, with_orbax)
    runs: dict[str, list[dict[str, Any]]] = {config_key(*c): [] for c in configs}
    # Untimed: the first `fit` on new data pays one-off set-up costs that
    # would otherwise fall on whichever configuration runs first.
    warm = 3 * spec.batch_size
    model.fit(x[:warm], y[:warm], batch_size=spec.batch_size, epochs=1,
              shuffle=False, verbose=0)
    # One callback per configuration, reused from round to round as in one
    # long `fit`: fastbackup allocates its host buffer at its first save
    # only (that one-off cost is section a's "first save"), taken here.
    instances: dict[str, Any] = {}
    for tool, freq in configs:
        if tool in ("keras", "fastbackup", OVERLAP_TOOL):
            key = config_key(tool, freq)
            instances[key] = _make_callback(
                tool, os.path.join(work_dir, f"loop-{tool}-{freq}"), freq or "epoch")
            if tool != "keras":  # untimed first save: allocates the buffer
                cb = instances[key]
                cb.set_model(model)
                cb.on_train_begin()
                cb._save(0, 0, block=True)
                cb.on_train_end()
    settle()
    orders: list[list[str]] = []
    for r in range(rounds):
        order = round_order(configs, r)
        orders.append([config_key(*c) for c in order])
        log(f"  round {r + 1}/{rounds}")
        for tool, freq in order:
            key = config_key(tool, freq)
            directory = os.path.join(work_dir, f"loop-{tool}-{freq}")
            callback = instances.get(key)
            if tool == "orbax":  # Orbax's callback closes itself at train end.
                callback = _make_callback(tool, directory, freq or "epoch")
            fast = tool in ("fastbackup", OVERLAP_TOOL)
            before = _writer_counts(callback) if fast else None
            timing = LoopTiming()
            callbacks = [timing.start] + ([callback] if callback else []) + [timing.stop]
            model.fit(
                **inputs, epochs=spec.loop_epochs, verbose=0, callbacks=callbacks,
            )
            run: dict[str, Any] = {
                "round": r,
                "loop_s": timing.loop_s,
                "steps_s": timing.steps_s,
                "end_s": timing.end_s,
                "cpu_s": timing.cpu_s,
                "median_step_s": median(timing.step_times()),
                # Every step, so that a stall shows where it happened.
                "step_times_s": [round(t, 4) for t in timing.step_times()],
            }
            if tool == "orbax":
                run.update(
                    saves=len(callback.blocking_seconds),  # type: ignore[union-attr]
                    coalesced=0,
                    median_blocking_s=median(callback.blocking_seconds),  # type: ignore[union-attr]
                )
            if before is not None:
                after = _writer_counts(callback)
                stats = callback.stats  # type: ignore[union-attr]
                run.update(
                    saves=after[0] - before[0],
                    coalesced=after[1] - before[1],
                    median_blocking_s=median(callback.blocking_seconds),  # type: ignore[union-attr]
                    median_write_s=median(stats.write_seconds[before[2]:]),
                )
                gate = getattr(callback, "_gate", None)
                if tool == OVERLAP_TOOL:
                    # How long each overlapped save held the next step's
                    # optimizer update (the copy not done by then); the
                    # gate outlives the run, its record is taken per run.
                    held = gate.held_seconds if gate is not None else []
                    run["overlapped"] = gate is not None
                    run["holds"] = len(held)
                    run["median_held_s"] = median(held) if held else 0.0
                    held.clear()
            runs[key].append(run)
            log(f"    {key:<18} loop {run['loop_s']:7.2f} s  "
                f"(steps {run['steps_s']:7.2f} s, end {run['end_s']:5.2f} s)")
            del callback
            shutil.rmtree(directory, ignore_errors=True)
            settle()
    for callback in instances.values():
        _close_writer(callback)
    instances.clear()

    def column(items: list[dict[str, Any]], name: str) -> list[float]:
        return [run[name] for run in items]

    def over(items: list[dict[str, Any]], name: str) -> float:
        """Median of `name` over the median without a callback, minus 1."""
        return statistics.median(column(items, name)) / statistics.median(
            column(runs["none"], name)) - 1.0

    summary: dict[str, Any] = {}
    for key, items in runs.items():
        paired = [
            run["loop_s"] / runs["none"][i]["loop_s"] - 1.0
            for i, run in enumerate(items)
        ]
        summary[key] = {
            "median_loop_s": median(column(items, "loop_s")),
            "median_steps_s": median(column(items, "steps_s")),
            "median_end_s": median(column(items, "end_s")),
            "median_step_s": median(column(items, "median_step_s")),
            "median_cpu_s": median(column(items, "cpu_s")),
            "overhead": over(items, "loop_s"),
            "overhead_paired": median(paired),
            "overhead_steps_only": over(items, "steps_s"),
            "cpu_overhead": over(items, "cpu_s"),
        }
        for extra in ("saves", "coalesced", "median_blocking_s", "median_write_s",
                      "median_held_s"):
            values = [run[extra] for run in items if run.get(extra) is not None]
            if values:
                summary[key][extra] = median(values)
    return {
        "steps": spec.loop_steps,
        "epochs": spec.loop_epochs,
        "save_freqs": list(save_freqs),
        "orbax": "installed" if with_orbax else "not installed",
        "orders": orders,
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
    built), the backups `measure_saves` left of one and the same state.
    Both files' cached pages are dropped before each restore, as after a
    preemption, when a new process or machine restores. Checks once that
    each restore reproduces the source model's state exactly.
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
    cached = (files["fastbackup_dir"], os.path.dirname(files["keras_weights"]))
    for r in range(rounds):
        order = round_order(list(steps), r)
        log(f"  round {r + 1}/{rounds}: {', '.join(order)}")
        for name in order:
            settle(*cached)
            steps[name]()
    del target
    gc.collect()
    return {
        "samples": samples,
        "median": {k: median(v) for k, v in samples.items()},
        "exact": {"fastbackup": fastbackup_exact, "keras": keras_exact},
    }
