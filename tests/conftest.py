"""Shared fixtures: quiet TensorFlow, small deterministic models."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

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


def dense_model(seed: int = 5, outputs: int = 4):
    """The sharding tests' model: Dense kernels to shard, and a Dropout.

    Its layers match a `LayoutMap` of `".*dense.*kernel"`; the seed makes
    every process of a job (and every run) start from the same values.
    `outputs=8` splits every sharded dimension (16 and 8) over up to 8
    devices.
    """
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.layers.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(0.2, seed=3),
        keras.layers.Dense(outputs),
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
def pytest_collection_modifyitems(config, items):
    """Deselects, by name, the tests a module lists in its `DESELECTED`
    (Keras's own tests that read Keras-private attributes:
    tests/test_keras_conformance.py, where each one's reason is given)."""
    keep, drop = [], []
    for item in items:
        names = getattr(getattr(item, "module", None), "DESELECTED", {})
        (drop if item.name in names else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# Object-store servers ---------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server, one process for the whole session."""
    from tests.object_servers import MotoServer

    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server behind the XML-API adapter, one of each for the
    whole session."""
    from tests.object_servers import GCSServer

    server = GCSServer().start()
    yield server
    server.stop()


class Bucket:
    """One object-store server as a test sees it: the URL of a new backup
    under a new bucket, and the server behind it.

    Attributes:
        scheme: "s3" or "gs".
        url: `s3://<bucket>/runs/job-1` or `gs://<bucket>/runs/job-1`.
        server: the server process object (`MotoServer` or the GCS one).
        env: the variables that point a client (this process's, or a
            worker's) at the server.
    """

    def __init__(self, scheme: str, url: str, server, env: dict[str, str]):
        self.scheme, self.url, self.server, self.env = scheme, url, server, env

    @property
    def name(self) -> str:
        return self.url.split("/")[2]

    def multipart_uploads(self) -> list[str]:
        """Ids of the multipart uploads in progress in this bucket."""
        if self.scheme == "s3":
            from tests.object_servers import list_multipart_uploads

            return list_multipart_uploads(self.server.endpoint, self.name)
        return self.server.multipart_uploads(self.name)

    def endpoint_variable(self) -> str:
        """The variable that points a client at this server."""
        return "AWS_ENDPOINT_URL" if self.scheme == "s3" else "STORAGE_EMULATOR_HOST"


# Every object-store test runs against each server (parametrize, don't copy):
# moto for S3; for GCS fake-gcs-server behind the XML-API adapter of
# tests/gcs_adapter.py.
BUCKET_SCHEMES = ["s3", "gs"]


def _open_bucket(request, monkeypatch, scheme: str) -> Bucket:
    """A new bucket on the `scheme` server, the client pointed at it."""
    if scheme == "s3":
        from tests.object_servers import s3_environ

        server = request.getfixturevalue("moto_server")
        env = s3_environ(server.endpoint)
        url = f"s3://{server.create_bucket()}/runs/job-1"
    elif scheme == "gs":
        server = request.getfixturevalue("gcs_server")
        env = {"STORAGE_EMULATOR_HOST": server.endpoint}
        url = f"gs://{server.create_bucket()}/runs/job-1"
    else:
        raise AssertionError(f"unknown scheme {scheme!r}")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Bucket(scheme, url, server, env)


@pytest.fixture(params=BUCKET_SCHEMES)
def bucket(request, monkeypatch) -> Iterator[Bucket]:
    """A new backup location on a real object-store server, per scheme."""
    opened = _open_bucket(request, monkeypatch, request.param)
    yield opened
    if request.param == "s3":
        opened.server.reset()


@pytest.fixture(params=["local", *BUCKET_SCHEMES])
def any_location(request, monkeypatch, tmp_path) -> Iterator[str]:
    """A new backup location of each kind: a local directory, then one on
    each object-store server."""
    if request.param == "local":
        # As the callback leaves it once it holds the lock.
        (tmp_path / "backup").mkdir()
        yield str(tmp_path / "backup")
        return
    opened = _open_bucket(request, monkeypatch, request.param)
    yield opened.url
    if request.param == "s3":
        opened.server.reset()


@pytest.fixture
def bucket_url(bucket) -> str:
    """The URL of `bucket`: a new backup on each object-store server."""
    return bucket.url


@pytest.fixture
def bucket_fault_proxy(bucket, monkeypatch):
    """A fault-injecting proxy in front of `bucket`'s server; the client
    goes through it."""
    from tests.object_servers import FaultProxy

    proxy = FaultProxy(bucket.server.port)
    monkeypatch.setenv(bucket.endpoint_variable(), proxy.endpoint)
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


def follow_states(procs: list[subprocess.Popen]) -> tuple[list[dict], list]:
    """Reads the `state EPOCH BATCH DIGEST` lines that
    tests/multiprocess_worker.py's `crash-train` processes print, each on a
    daemon thread of its own (started here). Returns one dict per process,
    digest by (epoch, batch), filled as the lines come, and the threads."""
    import threading

    states: list[dict[tuple[int, int], str]] = [{} for _ in procs]

    def read(i: int) -> None:
        assert procs[i].stdout is not None
        for line in procs[i].stdout:
            fields = line.split()
            if len(fields) == 4 and fields[0] == "state":
                states[i][(int(fields[1]), int(fields[2]))] = fields[3]

    readers = [threading.Thread(target=read, args=(i,), daemon=True)
               for i in range(len(procs))]
    for t in readers:
        t.start()
    return states, readers


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
