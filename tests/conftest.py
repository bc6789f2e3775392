"""Shared fixtures: quiet TensorFlow, small deterministic models."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fastbackup import format as fmt  # noqa: E402
from fastbackup._compat import native  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_fastbackup_env(monkeypatch):
    # A developer's FASTBACKUP_* settings must not change test outcomes.
    for name in list(os.environ):
        if name.startswith("FASTBACKUP_") and name != "FASTBACKUP_PURE_PYTHON":
            monkeypatch.delenv(name)
    keras.utils.set_random_seed(1234)


def make_model(units: int = 8, optimizer: str = "adam", input_dim: int = 6):
    """A small model with trainable, non-trainable, seed and metric state."""
    model = keras.Sequential(
        [
            keras.layers.Input((input_dim,)),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.25),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=optimizer, loss="mse", metrics=["mae"])
    return model


def fresh_model(units: int = 8, input_dim: int = 6):
    """A new, untrained model whose compiled metrics are built.

    On TensorFlow, compiled metrics are built only when a step is traced;
    `evaluate` builds them without touching weights or optimizer, so a
    restore can be compared bitwise on every variable. On TensorFlow the
    optimizer stays unbuilt, so restoring must build it.
    """
    model = make_model(units=units, input_dim=input_dim)
    x, y = make_data(n=2, input_dim=input_dim)
    model.evaluate(x, y, verbose=0)
    return model


def dense_model(seed: int = 5):
    """The sharding tests' model: Dense kernels to shard, and a Dropout.

    Its layers match a `LayoutMap` of `".*dense.*kernel"`; the seed makes
    every process of a job (and every run) start from the same values.
    """
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.layers.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(0.2, seed=3),
        keras.layers.Dense(4),
    ])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def same_arrays(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """True if two lists of arrays are equal bit for bit, dtypes included."""
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b)
    )


def make_data(n: int = 32, input_dim: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, input_dim)).astype("float32")
    y = (x.sum(axis=1, keepdims=True) * 0.5).astype("float32")
    return x, y


def all_state(model, metrics: bool = True) -> list[np.ndarray]:
    """Every variable a checkpoint covers, as numpy copies.

    Args:
        model: the model.
        metrics: include metric variables (Keras resets them at each epoch
            start, so a state read after that reset has them zeroed).
    """
    from fastbackup.snapshot import collect_variables

    return [
        np.array(v.numpy(), copy=True)
        for name, v in collect_variables(model)
        if metrics or not name.startswith("metrics.")
    ]


def assert_state_equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert x.tobytes() == y.tobytes(), f"variable #{i} differs"


class InterruptAt(keras.callbacks.Callback):
    """Raises RuntimeError at a given (epoch, batch) to simulate a crash."""

    def __init__(self, epoch: int, batch: int | None = None):
        super().__init__()
        self.epoch = epoch
        self.batch = batch
        self._current = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch
        if self.batch is None and epoch == self.epoch:
            raise RuntimeError("Interrupting!")

    def on_train_batch_end(self, batch, logs=None):
        if self._current == self.epoch and batch == self.batch:
            raise RuntimeError("Interrupting!")


# A byte of the first tensor (model.0, the first kernel) in a checkpoint:
# byte 24 of its stored bytes, after the version 2 prefix and its padding.
TENSOR_BYTE = 4096 + 24


def flip_byte(path, offset: int) -> None:
    """Damages a file in place: flips one bit of the byte at `offset`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def write_v1_file(path: str, tensors, step: int, epoch: int, batch: int,
                  created: float, extra: dict) -> None:
    """The version 1 layout, for files the checked-in one cannot cover.

    `tensors`: `(name, path, dtype, shape, codec, stored bytes, raw size)`.
    `test_fmt.test_v1_helper_matches_the_old_encoder` pins it to the real encoder.
    """
    payload, entries, offset = [], [], fmt.PREFIX_SIZE
    for name, vpath, dtype, shape, codec, stored, raw in tensors:
        entries.append([name, vpath, dtype, list(shape), codec, offset,
                        len(stored), raw, native.crc32c(stored)])
        payload.append(stored)
        offset += len(stored)
    header = msgpack.packb(
        {"format": 1, "step": step, "epoch": epoch, "batch": batch,
         "created": created, "extra": extra, "tensors": entries},
        use_bin_type=True)
    head = struct.pack("<QQII", offset, len(header), native.crc32c(header), 1)
    with open(path, "wb") as f:
        f.write(struct.pack("<8sII", fmt.MAGIC, 1, 0) + b"".join(payload)
                + header + head
                + struct.pack("<II8s", native.crc32c(head), 0, fmt.FOOTER_MAGIC))


def stored_tensors(path: str):
    """`write_v1_file`'s input, from any readable checkpoint."""
    out = []
    with fmt.CheckpointReader(path) as reader, open(path, "rb") as f:
        for e in reader.entries:
            f.seek(e.offset)
            out.append((e.name, e.path, e.dtype, e.shape, e.codec,
                        f.read(e.stored_size), e.raw_size))
        return out, reader.meta
# Object-store servers ---------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server, one process for the whole session."""
    from tests.object_servers import MotoServer

    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def s3_url(moto_server, monkeypatch):
    """`s3://<new bucket>/runs/job-1`, the client pointed at moto."""
    from tests.object_servers import s3_environ

    for name, value in s3_environ(moto_server.endpoint).items():
        monkeypatch.setenv(name, value)
    return f"s3://{moto_server.create_bucket()}/runs/job-1"


@pytest.fixture
def fault_proxy(moto_server, s3_url, monkeypatch):
    """A fault-injecting proxy in front of moto; the client goes through it."""
    from tests.object_servers import FaultProxy

    proxy = FaultProxy(moto_server.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server, one process for the whole session."""
    from tests.object_servers import FakeGCSServer

    server = FakeGCSServer().start()
    yield server
    server.stop()


@pytest.fixture
def gcs_url(gcs_server, monkeypatch):
    """`gs://<new bucket>/runs/job-1`, the client pointed at the emulator
    through `STORAGE_EMULATOR_HOST`, as a user would point it."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    return f"gs://{gcs_server.create_bucket()}/runs/job-1"


@pytest.fixture
def gcs_fault_proxy(gcs_server, gcs_url, monkeypatch):
    """A fault-injecting proxy in front of the GCS emulator; the client goes
    through it."""
    from tests.object_servers import FaultProxy

    proxy = FaultProxy(gcs_server.port)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
    yield proxy
    proxy.close()


# Worker processes -------------------------------------------------------------


def worker_env() -> dict[str, str]:
    """The environment for a worker: none of the developer's FASTBACKUP_*."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("FASTBACKUP_") or k == "FASTBACKUP_PURE_PYTHON"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(argvs: list[list[str]], timeout: float,
                check: bool = True) -> list:
    """Runs worker scripts side by side; returns each one's RESULT line.

    Each worker prints one line `RESULT <json>`. Every worker must exit 0
    within `timeout` seconds; all are killed on the way out, so that one
    stuck in a collective can never hang the suite.

    Args:
        argvs: each worker's arguments to the Python interpreter.
        timeout: seconds all of them may take together.
        check: require every worker to exit 0 with a RESULT line. When
            false, returns `(returncode, result or None, stderr)` for each
            worker instead, a worker still running at the deadline being
            killed (return code -9).
    """
    procs = [
        subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=worker_env())
        for argv in argvs
    ]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(
                    timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                if check:
                    raise
                proc.kill()
                out, err = proc.communicate(timeout=30)
            lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
            result = json.loads(lines[0][len("RESULT "):]) if lines else None
            if check:
                assert proc.returncode == 0, err[-3000:]
                assert result is not None, out[-3000:]
                results.append(result)
            else:
                results.append((proc.returncode, result, err[-3000:]))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    return results
