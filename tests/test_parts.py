"""Multi-process checkpoints on disk: parts, manifests, and restoring them.

The writing side (`parts.ProcessParts`, agreeing through JAX's
coordination service) runs in real 2-process jobs in `test_sharding.py`.
Here the files are made by hand from a real model's state, split into
shards the way two processes would write them, so that the format, the
local store's part files and the resharding restore are checked on every
backend.
"""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest

import fastbackup
from fastbackup import format as fmt
from fastbackup import restore
from fastbackup.errors import CheckpointCorruptError
from fastbackup.format import CheckpointReader
from fastbackup.snapshot import HostSnapshot, TensorSpec, collect_variables
from fastbackup.stores.local import LocalStore
from fastbackup.stores.names import part_name, part_step
from tests.conftest import (
    all_state,
    assert_state_equal,
    flip_byte,
    fresh_model,
    make_data,
)
from tests.test_format import _check_crafted, _raw_tensor, craft


def _split(name: str, value: np.ndarray) -> list[list[tuple]]:
    """Shards of one variable for two processes: `(spec, array)` each.

    Arrays of two rows or more are cut in two along their first axis, each
    half written by one process; the others are written whole by process 0
    (replicated data, written once).
    """
    shape = value.shape
    if value.ndim and shape[0] >= 2:
        cut = shape[0] // 2
        halves = [(0, value[:cut]), (cut, value[cut:])]
        return [
            [(TensorSpec(f"{name}:0", name, value.dtype, half.shape, shape,
                         (start,) + (0,) * (value.ndim - 1)), half)]
            for start, half in halves
        ]
    whole = TensorSpec(f"{name}:0", name, value.dtype, shape, shape,
                       (0,) * value.ndim)
    return [[(whole, value)], []]


def write_parts(directory: str, model, step: int = 4, epoch: int = 1,
                batch: int = 2) -> list[str]:
    """Writes `model`'s state as a 2-process checkpoint; returns part names."""
    pieces: list[list[tuple]] = [[], []]
    for name, variable in collect_variables(model):
        for index, shards in enumerate(_split(name, np.array(variable.numpy()))):
            pieces[index] += shards
    reports = []
    for index, shards in enumerate(pieces):
        snap = HostSnapshot(
            specs=[s for s, _ in shards], arrays=[a for _, a in shards],
            epoch=epoch, batch=batch, metadata={"position": "batch_end"},
            part=(index, 2),
        )
        name = part_name(step, index, 2)
        result = LocalStore(directory).write_part(
            name, step, fmt.encode(snap, fmt.CompressionPolicy(None), step),
            sync=False,
        )
        reports.append({"name": name, "size": result.nbytes})
    first = fmt.encode(
        HostSnapshot(specs=[], arrays=[], epoch=epoch, batch=batch,
                     metadata={"position": "batch_end"}, part=(0, 2)),
        fmt.CompressionPolicy(None), step,
    )
    LocalStore(directory).commit(step, fmt.encode_manifest(first.meta, reports),
                   sync=False)
    return [r["name"] for r in reports]


def blank():
    """A new model to restore into, its optimizer built as a restore needs."""
    model = fresh_model()
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.fixture
def trained():
    model = fresh_model()
    x, y = make_data()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    return model


def test_part_and_manifest_files_say_what_they_are(tmp_path, trained):
    names = write_parts(str(tmp_path), trained)
    assert names == ["ckpt-000000000004.part-00000-of-00002.fbk",
                     "ckpt-000000000004.part-00001-of-00002.fbk"]
    store = LocalStore(str(tmp_path))
    # Only the manifest is a checkpoint; the parts are listed as parts.
    assert [s for s, _ in store.list_checkpoints()] == [4]
    assert store.list_parts() == names
    with CheckpointReader(store.list_checkpoints()[0][1]) as manifest:
        assert manifest.is_manifest and not manifest.is_part
        assert manifest.entries == []
        assert [p["name"] for p in manifest.parts] == names
        assert (manifest.step, manifest.epoch, manifest.batch) == (4, 1, 2)
    with store.open_part(names[1]) as part:
        assert part.is_part and part.part == (1, 2)
        kernel = part.entries[0]
        assert kernel.name == "model.0:0" and kernel.variable == "model.0"
        # The second half of the first kernel (6 inputs x 8 units).
        assert kernel.global_shape == (6, 8) and kernel.start == (3, 0)
        assert kernel.shape == (3, 8)


def test_parts_restore_into_a_model_exactly(tmp_path, trained):
    write_parts(str(tmp_path), trained)
    target = blank()
    reader = restore.restore_latest(str(tmp_path), target, fall_back=False)
    assert (reader.step, reader.epoch, reader.batch) == (4, 1, 2)
    assert_state_equal(all_state(target), all_state(trained))


def test_parts_restore_through_the_callback_and_the_cli_reads_them(
        tmp_path, trained):
    write_parts(str(tmp_path), trained)
    target = fresh_model()
    cb = fastbackup.BackupAndRestore(tmp_path, delete_checkpoint=False)
    cb.set_model(target)
    cb.on_train_begin()
    assert cb.restored_from == (4, 1, 2)
    assert_state_equal(all_state(target), all_state(trained))
    cb.on_train_end()
    # read_state (the CLI's export) assembles whole arrays from the parts.
    store = LocalStore(str(tmp_path))
    with CheckpointReader(store.list_checkpoints()[0][1]) as manifest:
        with pytest.raises(ValueError, match="needs the store of its parts"):
            restore.read_state(manifest, blank())
        values = restore.read_state(manifest, blank(), store=store)
    assert_state_equal([v for _, v in values], all_state(trained))


def test_a_damaged_part_is_never_restored(tmp_path, trained):
    names = write_parts(str(tmp_path), trained)
    flip_byte(os.path.join(tmp_path, names[1]), fmt.ALIGNMENT + 8)
    target = blank()
    before = all_state(target)
    with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
        restore.restore_latest(str(tmp_path), target, fall_back=False)
    assert_state_equal(all_state(target), before)


def test_a_missing_part_makes_the_checkpoint_unusable(tmp_path, trained):
    names = write_parts(str(tmp_path), trained)
    os.unlink(os.path.join(tmp_path, names[0]))
    target = blank()
    before = all_state(target)
    with pytest.raises(CheckpointCorruptError, match="a part it names is missing"):
        restore.restore_latest(str(tmp_path), target, fall_back=False)
    assert_state_equal(all_state(target), before)


def test_a_part_of_another_checkpoint_is_refused(tmp_path, trained):
    # Step 5's parts under step 4's names: a manifest only takes the parts
    # it committed (same step and size).
    other = tmp_path / "other"
    other.mkdir()
    names = write_parts(str(other), trained, step=5)
    write_parts(str(tmp_path), trained)
    for index, name in enumerate(names):
        os.replace(other / name, tmp_path / part_name(4, index, 2))
    with pytest.raises(CheckpointCorruptError, match="not the part the manifest"):
        restore.restore_latest(str(tmp_path), blank(), fall_back=False)


def test_a_damaged_newest_falls_back_to_the_previous_whole_checkpoint(
        tmp_path, trained):
    # double_checkpoint: the older checkpoint may be of another kind.
    first = fresh_model()
    cb = fastbackup.BackupAndRestore(tmp_path, save_freq=1,
                                     delete_checkpoint=False,
                                     double_checkpoint=True)
    x, y = make_data(n=8)
    first.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    saved = all_state(first)
    names = write_parts(str(tmp_path), trained, step=7)
    flip_byte(os.path.join(tmp_path, names[0]), fmt.ALIGNMENT + 8)
    target = blank()
    reader = restore.restore_latest(str(tmp_path), target, fall_back=True)
    assert reader.step < 7
    assert_state_equal(all_state(target), saved)


def test_local_store_part_names_are_checked(tmp_path):
    store = LocalStore(str(tmp_path))
    for bad in ("ckpt-000000000001.fbk", "../x", "ckpt-1.part-0-of-2.fbk"):
        with pytest.raises(ValueError, match="Invalid part name"):
            store.open_part(bad)
        with pytest.raises(ValueError, match="Invalid part name"):
            store.remove_parts([bad])
    store.remove_parts([part_name(1, 0, 2)])  # missing: ignored
    assert part_step(part_name(12, 3, 4)) == 12
    assert part_step("ckpt-000000000012.fbk") is None


# Hostile files --------------------------------------------------------------


def _shard_entry(values, start, global_shape, name="model.0:0"):
    entry, payload = _raw_tensor(values, name=name, version=2)
    return entry + [[list(global_shape), list(start)]], payload


def _part_header(tensors, **extra):
    return {"format": 2, "step": 0, "epoch": 0, "batch": 0, "created": 0.0,
            "extra": {}, "tensors": tensors, "flags": fmt.FLAG_PART,
            "part": {"index": 0, "count": 2}, **extra}


def test_crafted_part_loads(tmp_path):
    entry, payload = _shard_entry(np.arange(4, dtype="float32"), [2], [6])
    p = str(tmp_path / "part.fbk")
    with open(p, "wb") as f:
        f.write(craft(payload=payload, header=_part_header([entry]),
                      version=2, flags=fmt.FLAG_PART))
    with CheckpointReader(p) as reader:
        assert reader.part == (0, 2)
        assert reader.entries[0].start == (2,)
        assert reader.entries[0].global_shape == (6,)


@pytest.mark.parametrize("shard, match", [
    ([[6], [3]], "invalid shard placement"),      # runs past the end
    ([[6], [-1]], "invalid shard placement"),
    ([[6, 1], [0, 0]], "invalid shard placement"),  # rank differs
    ("x", "invalid shard placement"),
])
def test_hostile_shard_placements(tmp_path, shard, match):
    entry, payload = _raw_tensor(np.arange(4, dtype="float32"), name="model.0:0",
                                 version=2)
    _check_crafted(tmp_path, craft(payload=payload,
                                   header=_part_header([entry + [shard]]),
                                   version=2, flags=fmt.FLAG_PART), match)


@pytest.mark.parametrize("flags, header, match", [
    # A whole file's flags set to a part's, and the reverse.
    (fmt.FLAG_PART, {"flags": 0}, "prefix flags disagree"),
    (0, {"flags": fmt.FLAG_PART}, "prefix flags disagree"),
    (4, {"flags": 4}, "unknown format flags"),
    (fmt.FLAG_MANIFEST, {"flags": fmt.FLAG_MANIFEST}, "no valid list of parts"),
    (fmt.FLAG_MANIFEST, {"flags": fmt.FLAG_MANIFEST,
                         "parts": [{"name": "../etc/passwd", "size": 1}]},
     "part #0 is invalid"),
    (fmt.FLAG_MANIFEST, {"flags": fmt.FLAG_MANIFEST,
                         "parts": [{"name": "a", "size": 1}] * 2},
     "names a part twice"),
    (fmt.FLAG_PART, {"flags": fmt.FLAG_PART, "part": {"index": 2, "count": 2}},
     "no valid position"),
])
def test_hostile_file_kinds(tmp_path, flags, header, match):
    base = {"format": 2, "step": 0, "epoch": 0, "batch": 0, "created": 0.0,
            "extra": {}, "tensors": []}
    _check_crafted(tmp_path, craft(header={**base, **header}, version=2,
                                   flags=flags), match)


def test_a_part_entry_must_carry_its_placement(tmp_path):
    # A part's entries have ten fields, a whole file's nine: neither kind
    # can be read as the other.
    entry, payload = _raw_tensor(np.arange(4, dtype="float32"),
                                 name="model.0:0", version=2)
    _check_crafted(tmp_path, craft(payload=payload, header=_part_header([entry]),
                                   version=2, flags=fmt.FLAG_PART),
                   "malformed entry")
    whole, payload = _raw_tensor(np.arange(4, dtype="float32"), version=2)
    _check_crafted(tmp_path, craft(payload=payload, header=_part_header([whole + [[[4], [0]]]]),
                                   version=2, flags=fmt.FLAG_PART),
                   "invalid tensor name")


def test_shards_that_do_not_tile_their_variable_are_refused(tmp_path, trained):
    # Two parts whose halves of the first kernel overlap: the values of
    # the rows between are nowhere, so the checkpoint is unusable.
    names = write_parts(str(tmp_path), trained)
    path = os.path.join(tmp_path, names[1])
    with CheckpointReader(path) as reader:
        header_offset = reader.entries[-1].offset + reader.entries[-1].stored_size \
            + reader.entries[-1].padding
    data = bytearray(open(path, "rb").read())
    footer = data[-fmt.FOOTER_SIZE:]
    h_len = int.from_bytes(footer[8:16], "little")
    header = msgpack.unpackb(bytes(data[header_offset:header_offset + h_len]),
                             raw=False)
    header["tensors"][0][9][1][0] = 2  # starts one row early
    _rewrite_header(path, bytes(data[:header_offset]), header)
    with pytest.raises(CheckpointCorruptError, match="do not cover it exactly"):
        restore.restore_latest(str(tmp_path), blank(), fall_back=False)


def _rewrite_header(path: str, body: bytes, header: dict) -> None:
    import struct

    from fastbackup._compat import native

    raw = msgpack.packb(header, use_bin_type=True)
    head = struct.pack("<QQII", len(body), len(raw), native.crc32c(raw), 2)
    with open(path, "wb") as f:
        f.write(body + raw + head
                + struct.pack("<II8s", native.crc32c(head), 0, fmt.FOOTER_MAGIC))
