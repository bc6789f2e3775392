"""Damaged and hostile checkpoint files.

Every damaged or hostile file gives `CheckpointCorruptError` (an `OSError`
naming the file): never another exception, never a crash, never a state
different from the one saved. Memory stays bounded whatever a header or a
zstd frame claims. At the restore level, a damaged newest checkpoint falls
back to the previous one with `double_checkpoint`, and otherwise raises:
it never silently starts from scratch.
"""

from __future__ import annotations

import os
import random
import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
import zstandard

import fastbackup
from fastbackup import format as fmt
from fastbackup import restore
from fastbackup._compat import native
from fastbackup.errors import CheckpointCorruptError
from fastbackup.format import CheckpointReader
from fastbackup.snapshot import HostSnapshot, TensorSpec, collect_variables
from fastbackup.stores.local import LocalStore
from fastbackup.stores.names import checkpoint_name
from tests.conftest import (
    all_state,
    assert_state_equal,
    fresh_model,
    make_data,
    make_model,
    stored_tensors,
    write_v1_file,
)

# Bytes that readers do not interpret (docs/format.md): the footer's
# reserved field. Damage there must leave the state unchanged; damage
# anywhere else must be detected, the prefix's flags included (a version 2
# header repeats them under its checksum; version 1 has none).

# A version 1 file written by the version 1 encoder (fastbackup at commit
# 1c8cce0, `format.encode` + `LocalStore.commit`) from `_snapshot()` with
# `taken_at=1700000000.25`, step 3, zstd level 1 with every tensor that
# shrinks compressed (so optimizer.1 is a zstd frame).
V1_FILE = os.path.join(os.path.dirname(__file__), "data", "v1-step3.fbk")


def _reserved(size: int) -> range:
    return range(size - fmt.FOOTER_SIZE + 28, size - fmt.FOOTER_SIZE + 32)


def _snapshot() -> HostSnapshot:
    rng = np.random.default_rng(7)
    arrays = {
        "model.0": rng.normal(size=(5, 3)).astype("float32"),
        "model.1": np.arange(3, dtype="float16"),
        "model.2": np.zeros((0, 4), "float32"),  # empty tensor
        "optimizer.0": np.array(17, dtype="int64"),  # scalar
        # Large and compressible: stored as a zstd frame.
        "optimizer.1": np.zeros(20000, "float32"),
        "optimizer.2": np.array([True, False, True]),
        "metrics.0": np.array([1.5, -2.25], "float64"),
    }
    specs = [TensorSpec(n, f"seq/{n.replace('.', '_')}", a.dtype, a.shape)
             for n, a in arrays.items()]
    return HostSnapshot(specs=specs, arrays=list(arrays.values()), epoch=2,
                        batch=5, metadata={"position": "batch_end"})


class _AlwaysCompress(fmt.CompressionPolicy):
    """Compresses whatever shrinks: no timing in the codec decision."""

    def _pays(self, data) -> bool:
        return True


@pytest.fixture(params=["v2", "v1"])
def good(request, tmp_path):
    """A small valid checkpoint: (path, bytes, expected tensors).

    "v2" is written by this fastbackup, "v1" by the version 1 encoder.
    """
    snap = _snapshot()
    if request.param == "v2":
        encoded = fmt.encode(snap, _AlwaysCompress(1), step=3)
        path = LocalStore(str(tmp_path)).commit(3, encoded, sync=False).path
    else:
        path = str(tmp_path / checkpoint_name(3))
        with open(V1_FILE, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
    data = open(path, "rb").read()
    expected = {s.name: a for s, a in zip(snap.specs, snap.arrays)}
    with CheckpointReader(path) as reader:
        codecs = {e.name: e.codec for e in reader.entries}
        assert reader.version == int(request.param[1])
    assert codecs["optimizer.1"] == "zstd" and codecs["model.0"] == "raw"
    return path, data, expected


def load(path: str) -> tuple[tuple[int, int, int], dict[str, np.ndarray]]:
    """Loads every tensor as a restore does; raises on any damage."""
    with CheckpointReader(path) as reader:
        out = {}
        for e in reader.entries:
            # Allocate only what a model could ask for (restore compares
            # shapes with the model's variables before allocating).
            assert e.raw_size < 1 << 24, "hostile size reached the caller"
            arr = np.empty(e.shape, e.np_dtype)
            reader.read_tensor(e, arr)
            out[e.name] = arr
        reader.verify()
        return (reader.step, reader.epoch, reader.batch), out


def _same(loaded, expected) -> bool:
    (position, tensors) = loaded
    if position != (3, 2, 5) or sorted(tensors) != sorted(expected):
        return False
    return all(
        tensors[n].dtype == expected[n].dtype
        and tensors[n].shape == expected[n].shape
        and tensors[n].tobytes() == expected[n].tobytes()
        for n in expected
    )


def _outcome(path: str, expected) -> str:
    """'corrupt' (detected) or 'same' (loaded the saved state exactly).

    Any other exception propagates and fails the test; loading a different
    state fails it too.
    """
    try:
        loaded = load(path)
    except CheckpointCorruptError as e:
        assert e.path == path and isinstance(e, OSError)
        return "corrupt"
    assert _same(loaded, expected), "a damaged file loaded a different state"
    return "same"


def test_valid_checkpoint_loads_exactly(good):
    path, _, expected = good
    assert _outcome(path, expected) == "same"


def test_truncation_at_every_offset_is_detected(good, tmp_path):
    path, data, expected = good
    damaged = str(tmp_path / "truncated.fbk")
    with open(damaged, "wb") as f:
        f.write(data)
    outcomes = {}
    # Shrinking one file in place: a version 2 file is tens of KB (its
    # padding), and rewriting it at each of its offsets would take minutes.
    for size in reversed(range(len(data))):
        os.truncate(damaged, size)
        outcomes[size] = _outcome(damaged, expected)
    assert set(outcomes.values()) == {"corrupt"}, [
        s for s, o in outcomes.items() if o != "corrupt"]
    print(f"\ntruncation: {len(outcomes)} offsets, all detected")


def test_random_bit_flips_are_detected(good, tmp_path):
    path, data, expected = good
    rng = random.Random(1234)
    damaged = str(tmp_path / "flipped.fbk")
    ignored = set(_reserved(len(data)))
    counts = {"corrupt": 0, "same": 0}
    for _ in range(1500):
        offset = rng.randrange(len(data))
        buf = bytearray(data)
        buf[offset] ^= 1 << rng.randrange(8)
        with open(damaged, "wb") as f:
            f.write(buf)
        outcome = _outcome(damaged, expected)
        counts[outcome] += 1
        if offset not in ignored:
            assert outcome == "corrupt", f"flip at offset {offset} not detected"
    # Multi-byte damage: random bursts of garbage, and zeroed ranges; 500
    # that change the file (zeroing padding changes nothing).
    bursts = 0
    while bursts < 500:
        offset = rng.randrange(len(data))
        length = rng.randrange(1, 64)
        buf = bytearray(data)
        end = min(offset + length, len(buf))
        if rng.random() < 0.5:
            buf[offset:end] = bytes(rng.randrange(256) for _ in range(end - offset))
        else:
            buf[offset:end] = bytes(end - offset)
        if buf == data:
            continue
        bursts += 1
        with open(damaged, "wb") as f:
            f.write(buf)
        outcome = _outcome(damaged, expected)
        counts[outcome] += 1
        if not set(range(offset, end)) <= ignored:
            assert outcome == "corrupt", f"damage at {offset}:{end} not detected"
    print(f"\nbit flips and bursts: {counts}")
    assert counts["corrupt"] >= 1900


def test_wrong_magic(good, tmp_path):
    _, data, expected = good
    cases = {
        "hdf5": b"\x89HDF\r\n\x1a\n" + data[8:],
        "zeros": bytes(len(data)),
        "text": b"not a checkpoint\n" * 40,
        "footer": data[:-8] + b"FBKPEN\n\n",
    }
    for name, content in cases.items():
        p = str(tmp_path / f"{name}.fbk")
        with open(p, "wb") as f:
            f.write(content)
        with pytest.raises(CheckpointCorruptError) as info:
            load(p)
        assert info.value.path == p


def test_future_format_version_asks_for_an_upgrade(good, tmp_path):
    _, data, _ = good
    p = str(tmp_path / "future.fbk")
    with open(p, "wb") as f:
        f.write(data[:8] + struct.pack("<I", 3) + data[12:])
    with pytest.raises(CheckpointCorruptError, match="version 3 is not supported.*upgrade"):
        load(p)


def test_prefix_and_footer_versions_must_agree(good, tmp_path):
    # A version 1 prefix on a version 2 body (or the reverse) would make the
    # reader apply the wrong layout; the footer's CRC'd version catches it.
    _, data, _ = good
    other = 1 if struct.unpack("<I", data[8:12])[0] == 2 else 2
    p = str(tmp_path / "mixed.fbk")
    with open(p, "wb") as f:
        f.write(data[:8] + struct.pack("<I", other) + data[12:])
    with pytest.raises(CheckpointCorruptError, match="footer checksum mismatch"):
        load(p)


# Crafted files: every checksum valid, the content hostile ---------------------


def _entry(name="model.0", path="seq/w", dtype="float32", shape=(4,),
           codec="raw", offset=16, stored=16, raw=16, crc=0):
    return [name, path, dtype, list(shape), codec, offset, stored, raw, crc]


def craft(tensors=None, payload=b"", header=None, *, raw_header=None,
          version=1, h_off=None, h_len=None, f_version=None,
          prefix_padding=None, flags=0) -> bytes:
    """A file whose footer and header checksums are valid.

    Version 2 files get the prefix's zero padding (or `prefix_padding`);
    `payload` must then hold the tensors' padding too.
    """
    if raw_header is None:
        if header is None:
            header = {"format": version, "step": 0, "epoch": 0, "batch": 0,
                      "created": 0.0, "extra": {}, "tensors": tensors or []}
        raw_header = msgpack.packb(header, use_bin_type=True)
    prefix = struct.pack("<8sII", fmt.MAGIC, version, flags)
    if version >= 2:
        prefix += bytes(fmt.ALIGNMENT - len(prefix)) if prefix_padding is None \
            else prefix_padding
    if f_version is None:
        f_version = version
    head = struct.pack(
        "<QQII",
        len(prefix) + len(payload) if h_off is None else h_off,
        len(raw_header) if h_len is None else h_len,
        native.crc32c(raw_header), f_version,
    )
    footer = head + struct.pack("<II8s", native.crc32c(head), 0, fmt.FOOTER_MAGIC)
    return prefix + payload + raw_header + footer


def _raw_tensor(values: np.ndarray, name="model.0", version=1, offset=None):
    """`(entry, payload)` of one raw tensor at the start of the payload.

    Version 2: the payload and the CRC include the zero padding.
    """
    b = values.tobytes()
    if version >= 2:
        b += bytes(fmt.align_up(len(b)) - len(b))
        default_offset = fmt.ALIGNMENT
    else:
        default_offset = fmt.PREFIX_SIZE
    return _entry(name=name, dtype=values.dtype.name, shape=values.shape,
                  offset=default_offset if offset is None else offset,
                  stored=values.nbytes, raw=values.nbytes,
                  crc=native.crc32c(b)), b


def _zstd_frame_declaring(declared: int | None, content: bytes) -> bytes:
    """A zstd frame of `content` whose header declares `declared` bytes.

    python-zstandard's `decompress()` would allocate whatever is declared;
    `None` omits the content size.
    """
    real = zstandard.ZstdCompressor(write_content_size=True).compress(content)
    fhd = real[4]
    fcs_sizes = {0: 1 if fhd & 0x20 else 0, 1: 2, 2: 4, 3: 8}
    assert fhd & 0x20 and not fhd & 0x03  # single segment, no dictionary
    blocks = real[5 + fcs_sizes[fhd >> 6]:]
    magic = real[:4]
    if declared is None:
        # No content size, not single-segment: a window descriptor (1 KiB).
        return magic + bytes([0x00, 0x00]) + blocks
    if declared < 1 << 32:
        return magic + bytes([0xA0]) + struct.pack("<I", declared) + blocks
    return magic + bytes([0xE0]) + struct.pack("<Q", declared) + blocks


def _check_crafted(tmp_path, content: bytes, match: str | None = None,
                   name="crafted.fbk"):
    p = str(tmp_path / name)
    with open(p, "wb") as f:
        f.write(content)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointCorruptError, match=match) as info:
            load(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.path == p
    # Whatever the file claims, loading it costs little memory.
    assert peak < 16 << 20, f"peak {peak} bytes"
    return info.value


@pytest.mark.parametrize("version", [1, 2])
def test_crafted_valid_file_loads(tmp_path, version):
    # The crafting helper itself makes loadable files, so each hostile
    # variant below fails for its one hostile field.
    values = np.arange(4, dtype="float32")
    entry, payload = _raw_tensor(values, version=version)
    p = str(tmp_path / "ok.fbk")
    with open(p, "wb") as f:
        f.write(craft([entry], payload, version=version))
    position, tensors = load(p)
    assert position == (0, 0, 0)
    assert tensors["model.0"].tobytes() == values.tobytes()


def test_footer_claiming_huge_header(tmp_path):
    values = np.arange(4, dtype="float32")
    entry, payload = _raw_tensor(values)
    for h_len in (2**62, 2**64 - 1, fmt.MAX_HEADER_BYTES + 1):
        _check_crafted(tmp_path, craft([entry], payload, h_len=h_len),
                       "header bounds")
    for h_off in (0, 15, 2**63):
        _check_crafted(tmp_path, craft([entry], payload, h_off=h_off),
                       "header bounds")


def test_footer_of_another_version(tmp_path):
    entry, payload = _raw_tensor(np.arange(4, dtype="float32"))
    _check_crafted(tmp_path, craft([entry], payload, f_version=2))


def test_header_claiming_huge_counts(tmp_path):
    # msgpack array/map/str headers claiming 2**32 - 1 elements or bytes,
    # with only a few present.
    claims = [
        b"\xdd\xff\xff\xff\xff\x01\x02",                # array32
        b"\xdf\xff\xff\xff\xff\xa1a\x01",               # map32
        b"\x81\xa7tensors\xdd\xff\xff\xff\xff\x90",     # tensors: array32
        b"\xdb\xff\xff\xff\xffabc",                     # str32
        b"\xc6\xff\xff\xff\xffabc",                     # bin32
        b"\x91" * 200_000 + b"\xc0",                    # nested 200k deep
    ]
    for raw in claims:
        _check_crafted(tmp_path, craft(raw_header=raw))


def test_header_with_too_many_tensors(tmp_path):
    header = {"format": 1, "step": 0, "epoch": 0, "batch": 0, "extra": {},
              "tensors": [0] * (fmt.MAX_TENSORS + 1)}
    _check_crafted(tmp_path, craft(header=header), "no valid tensor list")


def test_tensor_claiming_huge_size_without_the_bytes(tmp_path):
    # raw: a stored size beyond the file.
    entry = _entry(shape=(2**40,), stored=2**42, raw=2**42)
    _check_crafted(tmp_path, craft([entry], b"\0" * 16),
                   "payload size does not match")
    # zstd: a 1 TiB tensor from a 20-byte frame that declares 1 TiB too;
    # everything is consistent until the bytes are decoded.
    frame = _zstd_frame_declaring(2**40, b"\0" * 400)
    entry = _entry(shape=(2**38,), codec="zstd", stored=len(frame),
                   raw=2**40, crc=native.crc32c(frame))
    p = str(tmp_path / "huge.fbk")
    with open(p, "wb") as f:
        f.write(craft([entry], frame))
    tracemalloc.start()
    try:
        with CheckpointReader(p) as reader, pytest.raises(CheckpointCorruptError):
            reader.verify()  # the streaming check: bounded memory
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20
    # A restore never allocates it: the model's variables decide the sizes.
    model = make_model()
    model.build((None, 6))
    with CheckpointReader(p) as reader, pytest.raises(
        fastbackup.CheckpointMismatchError
    ):
        restore.read_state(reader, model)


@pytest.mark.parametrize("declared", [512 << 20, 2**40, 399, 401, 0, None])
def test_zstd_frame_size_disagreeing_with_header(tmp_path, declared):
    # The header says 400 bytes; the frame's own header says otherwise.
    # python-zstandard's decompress() trusts the frame: it must not see it.
    frame = _zstd_frame_declaring(declared, b"\1" * 400)
    assert zstandard.frame_content_size(frame) == (
        -1 if declared is None else declared)
    entry = _entry(shape=(100,), codec="zstd", stored=len(frame), raw=400,
                   crc=native.crc32c(frame))
    _check_crafted(tmp_path, craft([entry], frame),
                   "frame declares" if declared is not None else None)


def test_zstd_frame_decoding_to_fewer_bytes_than_declared(tmp_path):
    # Frame and header agree on 400 bytes; the blocks hold 300.
    frame = _zstd_frame_declaring(400, b"\1" * 300)
    entry = _entry(shape=(100,), codec="zstd", stored=len(frame), raw=400,
                   crc=native.crc32c(frame))
    _check_crafted(tmp_path, craft([entry], frame))


@pytest.mark.parametrize("name", [
    "model.0/../x", "../../etc/passwd", "model.0\x00", "/model.0", "model/0",
    "model..0", "..", "model.0.", "pickle.0", "model.-1", "", "model.0" * 50,
    b"model.0", 7, None,
])
def test_hostile_tensor_names(tmp_path, name):
    entry, payload = _raw_tensor(np.arange(4, dtype="float32"))
    entry[0] = name
    _check_crafted(tmp_path, craft([entry], payload), "invalid tensor name")


@pytest.mark.parametrize("vpath", [
    "../x", "a/../../b", "/etc/passwd", "a\x00b", "a" * 5000, 3,
])
def test_hostile_variable_paths(tmp_path, vpath):
    entry, payload = _raw_tensor(np.arange(4, dtype="float32"))
    entry[1] = vpath
    _check_crafted(tmp_path, craft([entry], payload), "invalid variable path")


@pytest.mark.parametrize("field,value,match", [
    (2, "object", "unsupported dtype"),
    (2, "<U8", "unsupported dtype"),
    (2, "float32 ", "unsupported dtype"),
    (3, [-4], "invalid shape"),
    (3, [1] * 33, "invalid shape"),
    (3, [2**48, 1], "invalid shape"),
    (3, "4", "invalid shape"),
    (4, "pickle", "unknown codec"),
    (5, 17, "offset mismatch"),
    (5, 2**64 - 1, "offset mismatch"),
    (6, -1, "invalid sizes"),
    (7, 12, "does not match shape"),
    (8, 2**32, "invalid sizes or checksum"),
    (8, 12345, "checksum mismatch"),
])
@pytest.mark.parametrize("version", [1, 2])
def test_hostile_tensor_fields(tmp_path, field, value, match, version):
    entry, payload = _raw_tensor(np.arange(4, dtype="float32"), version=version)
    entry[field] = value
    _check_crafted(tmp_path, craft([entry], payload, version=version), match)


@pytest.mark.parametrize("header,match", [
    ([1, 2, 3], "not a map"),
    ({"step": -1, "epoch": 0, "batch": 0, "tensors": []}, "'step'"),
    ({"step": 0, "epoch": "1", "batch": 0, "tensors": []}, "'epoch'"),
    ({"step": 0, "epoch": 0, "tensors": []}, "'batch'"),
    ({"step": 0, "epoch": 0, "batch": 0}, "tensor list"),
    ({"step": 0, "epoch": 0, "batch": 0, "tensors": {}}, "tensor list"),
    ({"step": 0, "epoch": 0, "batch": 0, "tensors": [], "extra": [1]},
     "'extra'"),
])
def test_hostile_header_fields(tmp_path, header, match):
    _check_crafted(tmp_path, craft(header=header), match)


def test_header_with_non_string_keys(tmp_path):
    raw = msgpack.packb({1: 2, "step": 0}, use_bin_type=True)
    _check_crafted(tmp_path, craft(raw_header=raw), "cannot be decoded")


def test_duplicate_and_overlapping_tensors(tmp_path):
    a, pa = _raw_tensor(np.arange(4, dtype="float32"))
    b, pb = _raw_tensor(np.arange(4, dtype="float32"))
    b[5] = 16 + len(pa)
    _check_crafted(tmp_path, craft([a, b], pa + pb), "appears twice")
    b[0] = "model.1"
    b[5] = 16  # overlaps the first tensor
    _check_crafted(tmp_path, craft([a, b], pa + pb), "offset mismatch")


def _v2_pair():
    """Two raw version 2 tensors: entries and the payload with padding."""
    a, pa = _raw_tensor(np.arange(4, dtype="float32"), version=2)
    b, pb = _raw_tensor(np.arange(3, dtype="int64"), name="model.1", version=2,
                        offset=fmt.ALIGNMENT + len(pa))
    return a, b, pa + pb


def test_v2_crafted_pair_loads(tmp_path):
    a, b, payload = _v2_pair()
    p = str(tmp_path / "pair.fbk")
    with open(p, "wb") as f:
        f.write(craft([a, b], payload, version=2))
    _, tensors = load(p)
    assert tensors["model.1"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("offset", [
    fmt.ALIGNMENT + 16,       # where version 1 would put it, unaligned
    fmt.ALIGNMENT + 4096 + 512,  # aligned to 512 only
    2 * fmt.ALIGNMENT + 4096,    # a page of padding too many
    fmt.ALIGNMENT,            # overlaps the first tensor
])
def test_v2_tensor_offsets_must_follow_the_padding(tmp_path, offset):
    a, b, payload = _v2_pair()
    b[5] = offset
    _check_crafted(tmp_path, craft([a, b], payload, version=2), "offset mismatch")


def test_v2_header_must_start_after_the_last_padding(tmp_path):
    a, b, payload = _v2_pair()
    # The header right after the last tensor's stored bytes, unpadded; and
    # a page of extra zeros before it.
    for body in (payload[: fmt.ALIGNMENT + 24], payload + bytes(fmt.ALIGNMENT)):
        _check_crafted(tmp_path, craft([a, b], body, version=2),
                       "payload size does not match")
    # A version 2 header that claims to start inside the prefix's padding.
    empty = craft([], b"", version=2)
    for h_off in (fmt.PREFIX_SIZE, fmt.ALIGNMENT - 1):
        _check_crafted(tmp_path, craft([], b"", version=2, h_off=h_off),
                       "header bounds")
    assert len(empty) > fmt.ALIGNMENT


def test_v2_nonzero_prefix_padding(tmp_path):
    a, b, payload = _v2_pair()
    for at in (0, 100, fmt.ALIGNMENT - fmt.PREFIX_SIZE - 1):
        padding = bytearray(fmt.ALIGNMENT - fmt.PREFIX_SIZE)
        padding[at] = 1
        _check_crafted(tmp_path, craft([a, b], payload, version=2,
                                       prefix_padding=bytes(padding)),
                       "prefix padding is not zero")


def test_v2_tensor_padding_is_covered_by_the_crc(tmp_path):
    a, b, payload = _v2_pair()
    bad = bytearray(payload)
    bad[16] = 0xFF  # model.0's padding, after its 16 stored bytes
    p = str(tmp_path / "pad.fbk")
    with open(p, "wb") as f:
        f.write(craft([a, b], bytes(bad), version=2))
    with CheckpointReader(p) as reader:
        for read in (
            lambda e: reader.read_tensor(e, np.empty(e.shape, e.np_dtype)),
            reader.verified_view,
        ):
            with pytest.raises(CheckpointCorruptError,
                               match="checksum mismatch in tensor model.0"):
                read(reader.entries[0])
        with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
            reader.verify()
    # A CRC over the stored bytes alone (version 1's) is wrong in version 2.
    a[8] = native.crc32c(np.arange(4, dtype="float32").tobytes())
    _check_crafted(tmp_path, craft([a, b], payload, version=2),
                   "checksum mismatch in tensor model.0")


def test_v2_zstd_tensor_padding(tmp_path):
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(
        bytes(400))
    slot = frame + bytes(fmt.align_up(len(frame)) - len(frame))
    entry = _entry(shape=(100,), codec="zstd", offset=fmt.ALIGNMENT,
                   stored=len(frame), raw=400, crc=native.crc32c(slot))
    p = str(tmp_path / "z.fbk")
    with open(p, "wb") as f:
        f.write(craft([entry], slot, version=2))
    _, tensors = load(p)
    assert tensors["model.0"].tobytes() == bytes(400)
    bad = bytearray(slot)
    bad[-1] = 1
    _check_crafted(tmp_path, craft([entry], bytes(bad), version=2),
                   "checksum mismatch")


def test_written_file_is_aligned(tmp_path):
    snap = _snapshot()
    encoded = fmt.encode(snap, _AlwaysCompress(1), step=3)
    path = LocalStore(str(tmp_path)).commit(3, encoded, sync=False).path
    data = open(path, "rb").read()
    with CheckpointReader(path) as reader:
        assert reader.version == fmt.VERSION == 2
        assert data[fmt.PREFIX_SIZE:fmt.ALIGNMENT] == bytes(
            fmt.ALIGNMENT - fmt.PREFIX_SIZE)
        end = fmt.ALIGNMENT
        for e in reader.entries:
            assert e.offset == end and e.offset % fmt.ALIGNMENT == 0
            assert e.padding == fmt.align_up(e.stored_size) - e.stored_size
            pad = data[e.offset + e.stored_size:e.offset + e.stored_size + e.padding]
            assert pad == bytes(e.padding)
            end += e.stored_size + e.padding
        footer = data[-fmt.FOOTER_SIZE:]
        assert struct.unpack("<Q", footer[:8])[0] == end


def test_v1_helper_matches_the_old_encoder(tmp_path):
    tensors, meta = stored_tensors(V1_FILE)
    p = str(tmp_path / "again.fbk")
    write_v1_file(p, tensors, meta["step"], meta["epoch"], meta["batch"],
              meta["created"], meta["extra"])
    assert open(p, "rb").read() == open(V1_FILE, "rb").read()


def test_v1_file_reads_exactly(tmp_path):
    expected = {s.name: a for s, a in zip(_snapshot().specs, _snapshot().arrays)}
    with CheckpointReader(V1_FILE) as reader:
        assert reader.version == 1
        assert [e.offset for e in reader.entries][0] == fmt.PREFIX_SIZE
        assert all(e.padding == 0 for e in reader.entries)
        assert reader.meta["created"] == 1700000000.25
        for e in reader.entries:
            view = reader.verified_view(e)
            assert view.tobytes() == expected[e.name].tobytes()
            del view
        reader.verify()
    assert _same(load(V1_FILE), expected)


def test_v1_backup_restores_into_a_model(tmp_path, two_checkpoints):
    # A backup written by the version 1 writer resumes training exactly.
    files, first, newest = two_checkpoints
    backup = tmp_path / "backup"
    backup.mkdir()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        tensors, meta = stored_tensors(str(tmp_path / name))
        write_v1_file(str(backup / name), tensors, meta["step"], meta["epoch"],
                  meta["batch"], meta["created"], meta["extra"])
        with CheckpointReader(str(backup / name)) as reader:
            assert reader.version == 1
    model = fresh_model()
    model.optimizer.build(model.trainable_variables)
    reader = restore.restore_latest(str(backup), model, fall_back=False)
    assert (reader.version, reader.step, reader.epoch) == (1, 1, 2)
    assert_state_equal(all_state(model), newest)


def test_payload_checksum_mismatch_never_reaches_the_caller(tmp_path):
    values = np.arange(4, dtype="float32")
    entry, payload = _raw_tensor(values)
    bad = bytearray(payload)
    bad[0] ^= 1
    p = str(tmp_path / "bad.fbk")
    with open(p, "wb") as f:
        f.write(craft([entry], bytes(bad)))
    out = np.full(4, 7, "float32")
    with CheckpointReader(p) as reader, pytest.raises(
        CheckpointCorruptError, match="checksum mismatch in tensor model.0"
    ):
        reader.read_tensor(reader.entries[0], out)


# Restore level -----------------------------------------------------------------


DAMAGE = ["flip_payload", "flip_header", "truncate_half", "truncate_footer",
          "empty", "garbage", "future_version"]


def _damage(path: str, kind: str) -> None:
    data = bytearray(open(path, "rb").read())
    if kind == "flip_payload":
        data[fmt.PREFIX_SIZE + 3] ^= 0x04
    elif kind == "flip_header":
        data[-fmt.FOOTER_SIZE - 5] ^= 0x80
    elif kind == "truncate_half":
        data = data[: len(data) // 2]
    elif kind == "truncate_footer":
        data = data[:-1]
    elif kind == "empty":
        data = bytearray()
    elif kind == "garbage":
        data = bytearray(random.Random(0).randbytes(len(data)))
    elif kind == "future_version":
        data[8:12] = struct.pack("<I", 9)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A backup directory with checkpoints at epoch 1 and 2, and the states."""
    backup = tmp_path_factory.mktemp("two") / "backup"
    x, y = make_data(n=16)
    model = make_model()
    cb = fastbackup.BackupAndRestore(backup, double_checkpoint=True,
                                     delete_checkpoint=False)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[cb])
    first = all_state(model)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    newest = all_state(model)
    assert [s for s, _ in LocalStore(str(backup)).list_checkpoints()] == [1, 0]
    files = {name: open(os.path.join(backup, name), "rb").read()
             for name in os.listdir(backup) if name.endswith(".fbk")}
    return files, first, newest


def _backup_from(tmp_path, files) -> str:
    backup = tmp_path / "backup"
    backup.mkdir(parents=True)
    for name, data in files.items():
        (backup / name).write_bytes(data)
    return str(backup)


def test_restore_level_damage(tmp_path, two_checkpoints):
    files, first, newest = two_checkpoints
    model = fresh_model()
    model.optimizer.build(model.trainable_variables)
    untouched = all_state(model)
    outcomes = {}
    for i, kind in enumerate(DAMAGE):
        backup = _backup_from(tmp_path / str(i), files)
        newest_path, previous_path = [p for _, p in LocalStore(backup).list_checkpoints()]
        _damage(newest_path, kind)
        # Without double_checkpoint: an error, never a silent fresh start,
        # and the model is not touched.
        with pytest.raises(CheckpointCorruptError) as info:
            restore.restore_latest(backup, model, fall_back=False)
        assert info.value.path == newest_path
        assert_state_equal(all_state(model), untouched)
        # With it: exactly the previous checkpoint's state.
        reader = restore.restore_latest(backup, model, fall_back=True)
        assert (reader.step, reader.epoch) == (0, 1)
        assert_state_equal(all_state(model), first)
        # Both damaged: an error, not a fresh start.
        _damage(previous_path, kind)
        for variable, value in zip([v for _, v in collect_variables(model)], untouched):
            variable.assign(value)
        with pytest.raises(CheckpointCorruptError):
            restore.restore_latest(backup, model, fall_back=True)
        assert_state_equal(all_state(model), untouched)
        outcomes[kind] = "fallback ok"
    print(f"\nrestore-level damage: {outcomes}")


def test_damaged_newest_through_the_callback(tmp_path, two_checkpoints):
    files, first, _ = two_checkpoints
    x, y = make_data(n=16)
    backup = _backup_from(tmp_path, files)
    newest_path = LocalStore(backup).list_checkpoints()[0][1]
    _damage(newest_path, "truncate_half")
    model = fresh_model()
    with pytest.raises(CheckpointCorruptError):
        model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[
            fastbackup.BackupAndRestore(backup)])
    # The damaged file is kept for inspection, not replaced by a fresh run.
    assert os.path.getsize(newest_path) == len(files[os.path.basename(newest_path)]) // 2
    cb = fastbackup.BackupAndRestore(backup, double_checkpoint=True,
                                     delete_checkpoint=False)
    cb.set_model(model)
    cb.on_train_begin()
    assert cb.restored_from == (0, 1, 0)
    assert_state_equal(all_state(model), first)
    cb.on_train_end()


def test_only_a_stray_temp_file_is_not_a_checkpoint(tmp_path):
    # A directory with nothing but a killed writer's temp file restores
    # nothing (there never was a checkpoint), and the temp file goes.
    backup = tmp_path / "backup"
    backup.mkdir()
    stray = backup / ".ckpt-000000000000.fbk.0123456789abcdef.tmp"
    stray.write_bytes(b"\x89FBKP\r\n\x1a partial")
    model = fresh_model()
    cb = fastbackup.BackupAndRestore(backup, delete_checkpoint=False)
    cb.set_model(model)
    cb.on_train_begin()
    assert cb.restored_from is None and not stray.exists()
    cb.on_train_end()
