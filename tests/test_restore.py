"""restore.py's reading side: what a restore reads from a bucket, and that
nothing it assigns escapes a checksum.

Bytes are counted on the wire: the client talks to the real object-store
server (moto, fake-gcs-server) through `tests.object_servers.FaultProxy`,
injecting no fault, whose server-to-client stream is counted.
"""

from __future__ import annotations


import numpy as np
import obstore
import pytest

from fastbackup import format as fmt
from fastbackup.errors import CheckpointCorruptError
from fastbackup.restore import make_ready, restore_latest
from fastbackup.snapshot import HostSnapshot, Snapshotter, TensorSpec
from fastbackup.stores.location import open_store
from fastbackup.stores.names import part_name
from tests.conftest import all_state, assert_state_equal, fresh_model, make_data

MiB = 1 << 20
# What a response adds to its body: status line and headers, generously.
HTTP_SLACK = 64 << 10


@pytest.fixture
def received(bucket, monkeypatch):
    """A proxy in front of `bucket`'s server, through which this process's
    client goes; its `received` counts what the server sent."""
    from tests.object_servers import FaultProxy

    proxy = FaultProxy(bucket.server.port)
    monkeypatch.setenv(bucket.endpoint_variable(), proxy.endpoint)
    yield proxy
    proxy.close()


def _tensors(count: int = 8, n: int = MiB // 4) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.standard_normal(n).astype("float32") for _ in range(count)]


def _encoded(arrays: list[np.ndarray]) -> fmt.EncodedCheckpoint:
    snap = HostSnapshot(
        [TensorSpec(f"model.{i}", f"w{i}", a.dtype, a.shape)
         for i, a in enumerate(arrays)],
        arrays, epoch=0, batch=0,
    )
    return fmt.encode(snap, fmt.CompressionPolicy(None), 0)


# Kernels and their optimizer slots of 2 MiB each: some requests cut them.
UNITS, INPUTS = 1024, 512


def _trained():
    model = fresh_model(units=UNITS, input_dim=INPUTS)
    x, y = make_data(n=8, input_dim=INPUTS)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    return model


def _flip(store, name: str, offset: int) -> None:
    key = store._key(name)  # noqa: SLF001
    data = bytearray(obstore.get(store.client, key).bytes())
    data[offset] ^= 0x01
    obstore.put(store.client, key, bytes(data))


def test_a_part_is_read_only_in_the_ranges_asked_for(bucket_url, received):
    arrays = _tensors()
    store = open_store(bucket_url)
    name = part_name(0, 0, 2)
    size = store.write_part(name, 0, _encoded(arrays), sync=True).nbytes
    assert size > 8 * MiB
    received.received = 0
    with store.open_part(name) as reader:
        opened = received.received
        # The prefix and the end of the object (footer, header): no tensor.
        assert opened < fmt.ALIGNMENT + (256 << 10) + 2 * HTTP_SLACK
        wanted = [reader.entries[2], reader.entries[5]]
        fmt.fetch([(reader, wanted)])
        fetched = received.received - opened
        assert 2 * MiB <= fetched < 2 * MiB + 2 * HTTP_SLACK
        for e in wanted:
            value = reader.verified_view(e)
            assert np.array_equal(value, arrays[int(e.name.split(".")[1])])
        # Already verified: viewing them reads nothing more.
        assert received.received - opened == fetched


def test_a_damaged_tensor_read_by_range_is_refused(bucket_url):
    arrays = _tensors()
    store = open_store(bucket_url)
    name = part_name(0, 0, 2)
    store.write_part(name, 0, _encoded(arrays), sync=True)
    with store.open_part(name) as reader:
        damaged = reader.entries[5]
    _flip(store, name, damaged.offset + 12345)
    with store.open_part(name) as reader:
        fmt.fetch([(reader, reader.entries[:5])])  # the others are intact
        with pytest.raises(CheckpointCorruptError, match="model.5"):
            fmt.fetch([(reader, [reader.entries[5]])])
        with pytest.raises(CheckpointCorruptError, match="model.5"):
            reader.verified_view(reader.entries[5])


@pytest.mark.parametrize("chunk", [None, 3 * MiB + 5])
def test_restore_latest_from_a_bucket_reads_each_byte_once(
    bucket_url, received, monkeypatch, chunk
):
    # chunk: requests that cut tensors in two (each then assembled).
    from fastbackup.stores import object_store

    model = _trained()
    snapshotter = Snapshotter(model)
    snapshot = snapshotter.take(HostSnapshot.allocate(snapshotter.layout()), 2, 0)
    store = open_store(bucket_url)
    size = store.commit(2, fmt.encode(snapshot, fmt.CompressionPolicy(None), 2),
                        sync=True).nbytes
    if chunk is not None:  # for the reads only (uploads need 5 MiB parts)
        monkeypatch.setattr(object_store, "PART_BYTES", chunk)
    target = fresh_model(units=UNITS, input_dim=INPUTS)
    make_ready(target)
    received.received = 0
    assert restore_latest(bucket_url, target, fall_back=False) is not None
    assert_state_equal(all_state(target, metrics=False),
                       all_state(model, metrics=False))
    requests = -(-size // object_store.PART_BYTES) + 1  # and the record
    assert size <= received.received < size + requests * HTTP_SLACK


def test_a_damaged_checkpoint_in_a_bucket_is_never_assigned(bucket_url):
    model = _trained()
    snapshotter = Snapshotter(model)
    snapshot = snapshotter.take(HostSnapshot.allocate(snapshotter.layout()), 2, 0)
    store = open_store(bucket_url)
    store.commit(2, fmt.encode(snapshot, fmt.CompressionPolicy(None), 2), sync=True)
    [(_, url)] = store.list_checkpoints()
    with store.open_checkpoint(url) as reader:
        last = reader.entries[-1]
    _flip(store, url.rsplit("/", 1)[1], last.offset)
    target = fresh_model(units=UNITS, input_dim=INPUTS)
    make_ready(target)
    before = all_state(target, metrics=False)
    with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
        restore_latest(bucket_url, target, fall_back=False)
    assert_state_equal(all_state(target, metrics=False), before)
