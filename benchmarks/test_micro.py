"""Micro-benchmarks of fastbackup's building blocks, with pytest-benchmark.

Run with::

    python -m pytest benchmarks/test_micro.py --benchmark-only

They live outside `tests/` (the suite's `testpaths`), so the test suite
never collects them. Each benchmark records the bytes it processes in
`extra_info["bytes"]`; divide by the mean time for a throughput. Sizes are
modest (64 MB) so that the whole file runs in about a minute.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from benchmarks.machine import is_memory_fs  # noqa: E402
from fastbackup import format as fmt  # noqa: E402
from fastbackup._compat import native  # noqa: E402
from fastbackup.snapshot import HostSnapshot, Snapshotter  # noqa: E402
from fastbackup.stores.local import LocalStore  # noqa: E402
from fastbackup.stores.names import checkpoint_name  # noqa: E402

PAYLOAD = 64 << 20
ROUNDS = 8


@pytest.fixture(scope="module")
def bench_dir() -> Iterator[str]:
    """A folder on a real disk: the working directory's when /tmp is tmpfs."""
    parent = tempfile.gettempdir()
    if is_memory_fs(parent):
        parent = os.getcwd()
    path = tempfile.mkdtemp(prefix=".fastbackup-micro-", dir=parent)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    """Three Dense(1024) layers with Adam: ~3.1 M parameters, ~38 MB of state."""
    keras.utils.set_random_seed(0)
    m = keras.Sequential(
        [keras.layers.Input((1024,))]
        + [keras.layers.Dense(1024, activation="relu") for _ in range(3)]
        + [keras.layers.Dense(1)]
    )
    m.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).standard_normal((64, 1024), dtype=np.float32)
    m.fit(x, x[:, :1], batch_size=32, verbose=0)  # builds and fills Adam's moments
    return m


@pytest.fixture(scope="module")
def snapshot(model: keras.Model) -> HostSnapshot:
    return Snapshotter(model).take(None, epoch=0, batch=0)


def _weights_like(nbytes: int) -> np.ndarray:
    """float32 N(0, 0.02), the statistics of initialised dense weights."""
    rng = np.random.default_rng(1)
    return (rng.standard_normal(nbytes // 4, dtype=np.float32) * 0.02)


def _snapshot_of(arrays: list[np.ndarray]) -> HostSnapshot:
    """A snapshot holding `arrays` directly, as the writer would get it."""
    from fastbackup.snapshot import TensorSpec

    specs = [TensorSpec(f"model.{i}", f"w{i}", a.dtype, a.shape) for i, a in enumerate(arrays)]
    return HostSnapshot(specs=specs, arrays=arrays)


def test_snapshot_take_reused_buffers(benchmark: Any, model: keras.Model) -> None:
    """The training thread's whole share of a save: copy into reused buffers."""
    snapshotter = Snapshotter(model)
    into = snapshotter.take(None, 0, 0)
    benchmark.extra_info["bytes"] = into.nbytes
    benchmark.pedantic(snapshotter.take, args=(into, 0, 0), rounds=ROUNDS * 2,
                       warmup_rounds=1)


def test_snapshot_copy_floor(benchmark: Any, snapshot: HostSnapshot) -> None:
    """`np.copyto` of the same bytes between two touched buffers: the floor."""
    src = [a.copy() for a in snapshot.arrays]
    dst = [np.empty_like(a) for a in src]

    def copy() -> None:
        for d, s in zip(dst, src):
            np.copyto(d, s)

    benchmark.extra_info["bytes"] = snapshot.nbytes
    benchmark.pedantic(copy, rounds=ROUNDS * 2, warmup_rounds=1)


@pytest.mark.parametrize("level", [None, 1], ids=["raw", "zstd1"])
@pytest.mark.parametrize("content", ["weights", "zeros"])
def test_encode(benchmark: Any, level: int | None, content: str) -> None:
    """`format.encode`: per-tensor codec decisions, and zstd where it pays."""
    data = _weights_like(PAYLOAD) if content == "weights" else np.zeros(PAYLOAD // 4, np.float32)
    snap = _snapshot_of([data.reshape(-1, 1024)])
    policy = fmt.CompressionPolicy(level)
    encoded = benchmark.pedantic(fmt.encode, args=(snap, policy, 0), rounds=ROUNDS,
                                 warmup_rounds=1)
    stored = sum(len(memoryview(s)) for s in encoded.segments)
    benchmark.extra_info.update(bytes=PAYLOAD, stored_bytes=stored,
                                ratio=round(PAYLOAD / stored, 3))


@pytest.mark.parametrize("sync", [True, False], ids=["fsync", "nosync"])
def test_native_commit(benchmark: Any, bench_dir: str, sync: bool) -> None:
    """`LocalStore.commit`: stream + CRC-32C, fdatasync, rename, directory fsync."""
    snap = _snapshot_of([_weights_like(PAYLOAD).reshape(-1, 1024)])
    encoded = fmt.encode(snap, fmt.CompressionPolicy(None), 0)
    steps = iter(range(1, 1 << 30))

    def commit() -> None:
        step = next(steps)
        LocalStore(bench_dir).commit(step, encoded, sync=sync)
        os.unlink(os.path.join(bench_dir, checkpoint_name(step)))

    benchmark.extra_info["bytes"] = PAYLOAD
    benchmark.pedantic(commit, rounds=ROUNDS, warmup_rounds=1)


def test_raw_write_fsync_floor(benchmark: Any, bench_dir: str) -> None:
    """An `os.write` loop of the same bytes, then `fsync`: the disk's floor."""
    buf = memoryview(_weights_like(PAYLOAD)).cast("B")
    path = os.path.join(bench_dir, "raw.bin")

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            offset = 0
            while offset < len(buf):
                offset += os.write(fd, buf[offset : offset + (16 << 20)])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(path)

    benchmark.extra_info["bytes"] = PAYLOAD
    benchmark.pedantic(write, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("size", [4 << 10, PAYLOAD], ids=["4KiB", "64MiB"])
def test_crc32c(benchmark: Any, size: int) -> None:
    """The native CRC-32C (hardware-accelerated where the CPU has it)."""
    data = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
    benchmark.extra_info.update(bytes=size, impl=getattr(native, "_crc32c_impl", "python"))
    if size >= 1 << 20:
        benchmark.pedantic(native.crc32c, args=(data,), rounds=ROUNDS * 2, warmup_rounds=1)
    else:
        benchmark(native.crc32c, data)


@pytest.mark.skipif(keras.backend.backend() == "jax",
                    reason="JAX saves synchronously: there is no gate")
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "idle_gate"])
def test_train_step_with_idle_update_gate(benchmark: Any, gated: bool) -> None:
    """One train step of a tiny model, with and without an idle update gate.

    The gate of `FASTBACKUP_OVERLAP=on` stays in the step between saves; on
    TensorFlow it is a `tf.numpy_function` in the traced step. The difference
    of the two means is its cost per step when no copy is pending.
    """
    from fastbackup.overlap import UpdateGate

    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.layers.Input((16,)), keras.layers.Dense(16),
                          keras.layers.Dense(1)])
    m.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).standard_normal((8, 16), dtype=np.float32)
    y = x[:, :1]
    gate = UpdateGate(m) if gated else None
    if gate is not None:
        gate.install()
    m.train_on_batch(x, y)  # traces the step (with the gate, if installed)
    try:
        benchmark.pedantic(m.train_on_batch, args=(x, y), rounds=300,
                           iterations=5, warmup_rounds=20)
    finally:
        if gate is not None:
            gate.uninstall()
    benchmark.extra_info["bytes"] = 0
