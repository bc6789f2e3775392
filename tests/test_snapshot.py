"""Tests of `fastbackup.snapshot`: which variables, in which order, and the
host copy that is taken on the training thread."""

from __future__ import annotations

import time
import types

import keras
import numpy as np
import pytest

from fastbackup import backend
from fastbackup import format as fmt
from fastbackup import snapshot as snapshot_lib
from fastbackup._compat import native
from fastbackup.errors import CheckpointCorruptError
from fastbackup.snapshot import (
    GROUPS,
    HostSnapshot,
    Snapshotter,
    TensorSpec,
    collect_variables,
    host_dtype,
)
from fastbackup.stores.local import LocalStore
from fastbackup.stores.location import open_store
from tests.conftest import fresh_model, make_data, make_model


def fake_model(variables=(), optimizer_variables=None, metrics_variables=()):
    """The three attributes `collect_variables` reads, and nothing else."""
    optimizer = (
        None if optimizer_variables is None
        else types.SimpleNamespace(variables=list(optimizer_variables))
    )
    return types.SimpleNamespace(
        variables=list(variables), optimizer=optimizer,
        metrics_variables=list(metrics_variables),
    )


def var(value, dtype="float32", name="v"):
    return keras.Variable(
        np.asarray(value, dtype=dtype), dtype=dtype, name=name,
        trainable=np.dtype(dtype).kind == "f",
    )


def trained_model():
    """A model whose optimizer and metrics are built and hold state."""
    model = make_model()
    x, y = make_data()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    return model


# collect_variables -------------------------------------------------------------


def test_groups_order():
    assert GROUPS == ("model", "optimizer", "metrics")


def test_collect_variables_order_and_names():
    model = trained_model()
    pairs = collect_variables(model)
    expected = (
        [(f"model.{i}", v) for i, v in enumerate(model.variables)]
        + [(f"optimizer.{i}", v) for i, v in enumerate(model.optimizer.variables)]
        + [(f"metrics.{i}", v) for i, v in enumerate(model.metrics_variables)]
    )
    assert [n for n, _ in pairs] == [n for n, _ in expected]
    assert all(a is b for (_, a), (_, b) in zip(pairs, expected))
    # Every group is really there: weights, optimizer slots, metric state.
    counts = {g: sum(n.startswith(g + ".") for n, _ in pairs) for g in GROUPS}
    assert counts == {"model": 9, "optimizer": 14, "metrics": 4}


def test_collect_variables_is_stable_across_instances():
    # Two instances of one architecture get the same names and shapes,
    # although Keras gives their layers different paths ("dense_3"...).
    a, b = trained_model(), trained_model()
    pa, pb = collect_variables(a), collect_variables(b)
    assert [n for n, _ in pa] == [n for n, _ in pb]
    assert [tuple(v.shape) for _, v in pa] == [tuple(v.shape) for _, v in pb]


def test_collect_variables_with_unbuilt_optimizer_and_metrics():
    model = make_model()
    pairs = collect_variables(model)
    names = [n for n, _ in pairs]
    assert names[: len(model.variables)] == [
        f"model.{i}" for i in range(len(model.variables))]
    assert len(pairs) == (len(model.variables) + len(model.optimizer.variables)
                          + len(model.metrics_variables))


def test_collect_variables_dedups_keeping_positions():
    a, b, c, d = (var(i, name=f"v{i}") for i in range(4))
    model = fake_model(variables=[a, b, a, c], optimizer_variables=[d, b],
                       metrics_variables=[c, d])
    pairs = collect_variables(model)
    # A variable reachable twice is saved once, under its first name; the
    # others keep their index in their group, so names stay stable.
    assert [(n, v.name) for n, v in pairs] == [
        ("model.0", "v0"), ("model.1", "v1"), ("model.3", "v2"),
        ("optimizer.0", "v3")]


def test_collect_variables_shared_layer_saved_once():
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4)
    model = keras.Model(inputs, shared(shared(inputs)))
    model.compile(optimizer="sgd", loss="mse")
    pairs = collect_variables(model)
    ids = [id(v) for _, v in pairs]
    assert len(ids) == len(set(ids))
    assert [v.path for n, v in pairs if n.startswith("model.")] == [
        shared.kernel.path, shared.bias.path]


def test_collect_variables_without_optimizer_attribute():
    assert [n for n, _ in collect_variables(fake_model([var(1)]))] == ["model.0"]


def test_collect_variables_of_uncompiled_model():
    model = keras.Sequential([keras.layers.Input((3,)), keras.layers.Dense(2)])
    assert [n for n, _ in collect_variables(model)] == ["model.0", "model.1"]


# Snapshotter.take --------------------------------------------------------------


def test_take_copies_every_variable():
    model = trained_model()
    snapper = Snapshotter(model)
    before = time.time()
    snap = snapper.take(None, epoch=2, batch=5)
    assert isinstance(snap, HostSnapshot)
    assert (snap.epoch, snap.batch, snap.metadata) == (2, 5, {})
    assert before <= snap.taken_at <= time.time()
    pairs = collect_variables(model)
    assert [s.name for s in snap.specs] == [n for n, _ in pairs]
    for i, (spec, array, (name, variable)) in enumerate(
            zip(snap.specs, snap.arrays, pairs)):
        value = np.asarray(variable.numpy())
        assert spec.path == variable.path
        assert spec.shape == tuple(variable.shape) == array.shape
        assert spec.dtype == array.dtype == value.dtype
        assert array.tobytes() == value.tobytes(), name
        # A copy in a buffer of our own (page-aligned, zero-padded), never
        # an alias of the backend's memory.
        assert array.flags.c_contiguous and array.flags.writeable
        assert not np.shares_memory(array, snapper._read(variable))
        assert snap.padded_region(i) is not None, name
    assert snap.nbytes == sum(s.nbytes for s in snap.specs)


def test_snapshot_does_not_change_when_variables_change():
    model = trained_model()
    snap = Snapshotter(model).take(None, 1, 0)
    copied = [a.copy() for a in snap.arrays]
    x, y = make_data()
    model.train_on_batch(x[:8], y[:8])
    for _, variable in collect_variables(model):
        if variable.dtype.startswith("float"):
            variable.assign(variable + 1)
    after = [np.asarray(v.numpy()) for _, v in collect_variables(model)]
    assert any(a.tobytes() != b.tobytes() for a, b in zip(copied, after))
    for a, b in zip(snap.arrays, copied):
        assert a.tobytes() == b.tobytes()


def test_buffers_are_reused_between_saves():
    model = trained_model()
    snapper = Snapshotter(model)
    first = snapper.take(None, 1, 0)
    arrays, specs = list(first.arrays), list(first.specs)
    x, y = make_data()
    model.train_on_batch(x[:8], y[:8])
    second = snapper.take(first, 1, 1)
    assert second is first
    assert all(a is b for a, b in zip(second.arrays, arrays))
    assert second.specs == specs
    # The reused buffers hold the new state.
    for array, (_, variable) in zip(second.arrays, collect_variables(model)):
        assert array.tobytes() == np.asarray(variable.numpy()).tobytes()
    assert (second.epoch, second.batch) == (1, 1)


def test_metadata_is_reset_on_reuse():
    model = fake_model([var([1.0, 2.0])])
    snapper = Snapshotter(model)
    snap = snapper.take(None, 0, 0)
    snap.metadata = {"resume_mid_epoch": True}
    assert snapper.take(snap, 0, 1).metadata == {}


def test_buffer_reallocated_when_shape_changes():
    a, b = var(np.ones((2, 3)), name="a"), var([5.0], name="b")
    model = fake_model([a, b])
    snapper = Snapshotter(model)
    snap = snapper.take(None, 0, 0)
    old_a, old_b = snap.arrays
    bigger = var(np.full((4, 3), 7.0), name="a")
    model.variables = [bigger, b]
    snapper.refresh()
    again = snapper.take(snap, 0, 1)
    assert again is snap
    assert again.arrays[0] is not old_a and again.arrays[1] is old_b
    assert again.arrays[0].shape == (4, 3) and (again.arrays[0] == 7).all()
    assert old_a.shape == (2, 3) and (old_a == 1).all()
    assert again.specs[0].shape == (4, 3)
    assert again.specs[0].nbytes == 4 * 3 * 4


def test_buffer_reallocated_when_dtype_changes():
    model = fake_model([var([1, 2, 3], dtype="float32")])
    snapper = Snapshotter(model)
    snap = snapper.take(None, 0, 0)
    old = snap.arrays[0]
    model.variables = [var([1, 2, 3], dtype="int32")]
    snapper.refresh()
    snapper.take(snap, 0, 1)
    assert snap.arrays[0] is not old and snap.arrays[0].dtype == np.int32
    assert snap.specs[0].dtype == np.int32
    assert old.dtype == np.float32


def test_buffers_matched_by_name_when_variable_count_changes():
    model = fake_model([var([1.0])])
    snapper = Snapshotter(model)
    snap = snapper.take(None, 0, 0)
    [old] = snap.arrays
    model.variables = [var([1.0]), var([2.0])]
    snapper.refresh()
    again = snapper.take(snap, 0, 1)
    assert again is snap
    # model.0 keeps its buffer (same shape and dtype); model.1 gets one.
    assert again.arrays[0] is old and again.arrays[1] is not old
    assert [a.tolist() for a in again.arrays] == [[1.0], [2.0]]
    assert [s.name for s in again.specs] == ["model.0", "model.1"]
    assert old.tolist() == [1.0] and again.arrays[0].tolist() == [1.0]


def test_specs_follow_the_variables_when_buffers_are_reused():
    a, b = var([1.0, 2.0], name="a"), var([3.0, 4.0], name="b")
    model = fake_model([a], optimizer_variables=[b])
    snapper = Snapshotter(model)
    snap = snapper.take(None, 0, 0)
    assert [s.name for s in snap.specs] == ["model.0", "optimizer.0"]
    # Same count, shapes and dtypes, different variables and groups.
    model.variables, model.optimizer = [a, b], None
    snapper.refresh()
    snapper.take(snap, 0, 1)
    assert [s.name for s in snap.specs] == ["model.0", "model.1"]
    assert [s.path for s in snap.specs] == [a.path, b.path]


def test_variables_collected_again_until_optimizer_exists_then_cached():
    model = make_model()
    model.build((None, 6))
    snapper = Snapshotter(model)
    if not model.optimizer.built:
        before = snapper.variables()
        model.optimizer.build(model.trainable_variables)
        # Optimizer variables appear in the first train step: not cached yet.
        assert len(snapper.variables()) > len(before)
    model.evaluate(*make_data(n=2), verbose=0)  # builds compiled metrics
    complete = snapper.variables()
    assert snapper.variables() is complete
    snapper.refresh()
    after = snapper.variables()
    assert after is not complete
    assert [n for n, _ in after] == [n for n, _ in collect_variables(model)]


def test_take_keeps_scalars_and_dtypes():
    model = fake_model([var([1, 2], dtype="float16"), var(7, dtype="int32"),
                        var(2.5, dtype="float32"), var(np.zeros((0, 4)))])
    snap = Snapshotter(model).take(None, 0, 0)
    assert [a.dtype.name for a in snap.arrays] == [
        "float16", "int32", "float32", "float32"]
    assert [a.shape for a in snap.arrays] == [(2,), (), (), (0, 4)]
    assert snap.arrays[0].tolist() == [1, 2]
    assert int(snap.arrays[1]) == 7 and float(snap.arrays[2]) == 2.5


@pytest.mark.parametrize("dtype", ["float64", "int64", "float32", "bfloat16"])
def test_layout_predicts_the_stored_dtype(dtype):
    # JAX without x64 stores a float64 or int64 variable as float32 or
    # int32: the layout, the copy and what a restore compares must all be
    # the stored dtype, not the declared one.
    variable = var([1, 2, 3], dtype=dtype)
    stored = backend.current().read_host(variable).dtype
    assert host_dtype(variable) == stored
    snapshotter = Snapshotter(fake_model([variable]))
    (spec,) = snapshotter.layout()
    assert spec.dtype == stored
    assert snapshotter.take(None, 0, 0).specs[0].dtype == stored


def test_take_copies_bfloat16():
    snap = Snapshotter(fake_model([var([3.5, -1.0], dtype="bfloat16")])).take(
        None, 0, 0)
    assert snap.arrays[0].dtype.name == "bfloat16"
    assert snap.arrays[0].astype(np.float32).tolist() == [3.5, -1.0]


def test_take_copies_a_bfloat16_scalar():
    snap = Snapshotter(fake_model([var(3.5, dtype="bfloat16")])).take(None, 0, 0)
    assert snap.arrays[0].dtype.name == "bfloat16" and snap.arrays[0].shape == ()
    assert float(snap.arrays[0]) == 3.5


def test_snapshot_of_restored_fresh_model_matches():
    # A fresh model with built metrics (conftest) snapshots every group.
    model = fresh_model()
    model.optimizer.build(model.trainable_variables)
    snap = Snapshotter(model).take(None, 0, 0)
    groups = {s.name.split(".")[0] for s in snap.specs}
    assert groups == {"model", "optimizer", "metrics"}


def test_tensor_spec_nbytes():
    assert TensorSpec("model.0", "p", np.dtype("float32"), (3, 4)).nbytes == 48
    assert TensorSpec("model.0", "p", np.dtype("int64"), ()).nbytes == 8
    assert TensorSpec("model.0", "p", np.dtype("float16"), (0, 5)).nbytes == 0


# Aligned buffers (zero-copy O_DIRECT writes) -----------------------------------


def _specs():
    return [
        # 300,000 bytes: above the native writer's zero-copy threshold.
        TensorSpec("model.0", "w", np.dtype("float32"), (300, 250)),
        TensorSpec("model.1", "b", np.dtype("float16"), (3,)),
        TensorSpec("model.2", "e", np.dtype("float32"), (0, 4)),
        TensorSpec("optimizer.0", "i", np.dtype("int64"), ()),
        TensorSpec("optimizer.1", "m", np.dtype("float32"), (1024,)),  # 1 page
    ]


def test_allocate_lays_buffers_out_like_the_file():
    snap = HostSnapshot.allocate(_specs())
    offsets = []
    base = snap.arrays[0].ctypes.data
    for i, (spec, array) in enumerate(zip(snap.specs, snap.arrays)):
        assert array.shape == spec.shape and array.dtype == spec.dtype
        assert array.flags.c_contiguous and array.flags.writeable
        region = snap.padded_region(i)
        assert region is not None
        assert len(region) == fmt.align_up(spec.nbytes)
        if spec.nbytes:
            assert np.frombuffer(region, np.uint8).ctypes.data == array.ctypes.data
            assert array.ctypes.data % fmt.ALIGNMENT == 0
            offsets.append(array.ctypes.data - base)
        # The padding is zero, and filling the array does not touch it.
        array.reshape(-1).view(np.uint8)[:] = 0xAB
        padded = bytes(region)
        assert padded[: spec.nbytes] == b"\xab" * spec.nbytes
        assert padded[spec.nbytes:] == bytes(len(padded) - spec.nbytes)
    # One mapping, tensors one after the other as in a version 2 file.
    assert offsets == [0, 74 * 4096, 75 * 4096, 76 * 4096]


def test_padded_region_is_none_for_ordinary_arrays():
    specs = _specs()
    plain = HostSnapshot(specs, [np.zeros(s.shape, s.dtype) for s in specs])
    assert [plain.padded_region(i) for i in range(len(specs))] == [None] * 5
    snap = HostSnapshot.allocate(specs)
    # An array swapped in without its region is not mistaken for one.
    snap.arrays[0] = np.zeros((300, 250), "float32")
    assert snap.padded_region(0) is None and snap.padded_region(1) is not None


def test_take_fills_aligned_buffers_and_realigns_new_shapes():
    a, b = var(np.ones((2, 3)), name="a"), var([5.0], name="b")
    model = fake_model([a, b])
    snapper = Snapshotter(model)
    snap = snapper.take(HostSnapshot.allocate(snapper.layout()), 0, 0)
    assert all(snap.padded_region(i) is not None for i in range(2))
    model.variables = [var(np.full((40, 30), 7.0), name="a"), b]
    snapper.refresh()
    snapper.take(snap, 0, 1)
    region = snap.padded_region(0)
    assert region is not None and len(region) == fmt.align_up(40 * 30 * 4)
    assert snap.arrays[0].ctypes.data % fmt.ALIGNMENT == 0
    assert bytes(region)[40 * 30 * 4:] == bytes(len(region) - 40 * 30 * 4)
    assert (snap.arrays[0] == 7).all() and snap.padded_region(1) is not None


def test_take_into_ordinary_arrays_keeps_them():
    # A snapshot made of ordinary arrays (no regions) is filled as before;
    # the writer then goes through the bounce buffer for it.
    model = fake_model([var([1.0, 2.0], name="a")])
    snapper = Snapshotter(model)
    plain = HostSnapshot(snapper.layout(), [np.zeros(2, "float32")])
    array = plain.arrays[0]
    snapper.take(plain, 0, 0)
    assert plain.arrays[0] is array and array.tolist() == [1.0, 2.0]
    assert plain.padded_region(0) is None


@pytest.mark.parametrize("direct", [False, True])
def test_aligned_and_ordinary_buffers_write_the_same_file(tmp_path, direct):
    specs = _specs()
    aligned = HostSnapshot.allocate(specs)
    rng = np.random.default_rng(0)
    for array in aligned.arrays:
        array.reshape(-1).view(np.uint8)[:] = rng.integers(
            0, 256, array.nbytes, np.uint8)
    plain = HostSnapshot(specs, [a.copy() for a in aligned.arrays])
    files = []
    for i, snap in enumerate((aligned, plain)):
        snap.epoch, snap.batch, snap.taken_at = 1, 2, 3.0
        encoded = fmt.encode(snap, fmt.CompressionPolicy(None), step=i)
        # The aligned snapshot's raw tensors are one segment each, padding
        # included; the ordinary one's padding comes as segments of zeros.
        assert len(encoded.segments) == (6 if snap is aligned else 9)
        (tmp_path / str(i)).mkdir()
        path = LocalStore(str(tmp_path / str(i))).commit(i, encoded, sync=False,
                              direct=direct).path
        data = bytearray(open(path, "rb").read())
        files.append(data)
        with fmt.CheckpointReader(path) as reader:
            for e, array in zip(reader.entries, snap.arrays):
                out = np.empty(e.shape, e.np_dtype)
                reader.read_tensor(e, out)
                assert out.tobytes() == array.tobytes()
            reader.verify()
    # Byte for byte the same but for the step in the header (and its CRCs).
    assert len(files[0]) == len(files[1])
    header_start = fmt.ALIGNMENT + sum(fmt.align_up(s.nbytes) for s in specs)
    assert files[0][:header_start] == files[1][:header_start]


# Checksums taken while copying ---------------------------------------------------


def test_take_checksums_every_array_while_copying():
    model = trained_model()
    snapper = Snapshotter(model)
    snap = snapper.take(None, 0, 0)
    assert len(snap.crcs) == len(snap.arrays)
    for i, array in enumerate(snap.arrays):
        assert snap.copied_crc32c(i) == native.crc32c(
            array.reshape(-1).view(np.uint8))
    # Reused buffers get the new state's checksums.
    before = list(snap.crcs)
    model.fit(*make_data(), epochs=1, batch_size=8, verbose=0)
    snapper.take(snap, 0, 1)
    assert snap.crcs != before
    assert snap.crcs == [native.crc32c(a.reshape(-1).view(np.uint8))
                         for a in snap.arrays]


def test_deferred_copies_record_their_checksums_when_they_run():
    model = trained_model()
    snapper = Snapshotter(model)
    trainable = {id(v) for v in model.trainable_variables}
    snap, deferred = snapper.take_split(
        None, 0, 0, defer=lambda v: id(v) in trainable)
    waiting = [i for i, c in enumerate(snap.crcs) if c is None]
    assert len(waiting) == len(deferred) == len(model.trainable_variables)
    deferred.run()
    assert snap.crcs == [native.crc32c(a.reshape(-1).view(np.uint8))
                         for a in snap.arrays]


def test_a_copy_without_a_checksum_leaves_it_to_the_writer(monkeypatch, tmp_path):
    # The pure-Python fallback's checksum would stall training: there the
    # copy is numpy's, and the writer checksums what it writes.
    monkeypatch.setattr(snapshot_lib, "_CHECKSUM_WHILE_COPYING", False)
    snap = Snapshotter(trained_model()).take(None, 0, 0)
    assert snap.crcs == [None] * len(snap.arrays)
    encoded = fmt.encode(snap, fmt.CompressionPolicy(None), step=0)
    assert encoded.known_crcs == [None] * len(encoded.segments)
    path = LocalStore(str(tmp_path)).commit(0, encoded, sync=False).path
    with fmt.CheckpointReader(path) as reader:
        reader.verify()


def test_a_non_contiguous_source_is_copied_without_a_checksum():
    dst = np.zeros((4, 3), "float32")
    src = np.arange(24, dtype="float32").reshape(4, 6)[:, ::2]
    assert snapshot_lib.copy_checksummed(dst, src) is None
    assert np.array_equal(dst, src)


@pytest.mark.parametrize("direct", [False, True])
def test_stores_write_the_checksums_taken_while_copying(any_location, direct):
    # Each store takes a raw tensor's CRC from the copy instead of reading
    # the tensor again: a CRC made wrong on purpose reaches the header, and
    # the reader then refuses that tensor.
    model = trained_model()
    snap = Snapshotter(model).take(None, 1, 2)
    store = open_store(any_location)
    encoded = fmt.encode(snap, fmt.CompressionPolicy(None), step=0)
    assert all(encoded.known_crcs[e["segment"]] is not None
               for e in encoded.entries)
    good = store.commit(0, encoded, sync=True, direct=direct)
    with store.open_checkpoint(good.path) as reader:
        reader.verify()
        by_name = {e.name: e for e in reader.entries}
    first = snap.specs[0].name
    wrong = dict(enumerate(snap.crcs))
    wrong[0] ^= 1
    snap.crcs = [wrong[i] for i in range(len(snap.arrays))]
    bad = store.commit(1, fmt.encode(snap, fmt.CompressionPolicy(None), 1),
                       sync=True, direct=direct)
    with store.open_checkpoint(bad.path) as reader:
        entry = {e.name: e for e in reader.entries}[first]
        assert entry.crc32c != by_name[first].crc32c
        with pytest.raises(CheckpointCorruptError, match=first):
            reader.verify()
