"""The checkpoint file format: encoding on the writer thread, safe decoding.

Layout of a checkpoint file (all integers little-endian)::

    prefix   16 bytes   magic b"\\x89FBKP\\r\\n\\x1a", u32 version, u32 flags,
                        then (version 2) zeros up to offset 4096
    payload  tensors' stored bytes in header order; in version 2 each
             starts at a multiple of 4096 and is followed by zeros up to the
             next one (version 1: back to back from offset 16)
    header   msgpack map (see `docs/format.md`): training position, metadata
             and one entry per tensor with its codec, offset, sizes and the
             CRC-32C of its stored bytes
    footer   40 bytes   u64 header offset, u64 header length,
                        u32 CRC-32C of the header, u32 version,
                        u32 CRC-32C of the preceding 24 footer bytes,
                        u32 reserved (0), magic b"FBKPEND\\n"

The header comes last so that the payload can be streamed to disk with its
checksums computed in the same pass, while each buffer is still in cache; the
writer never joins the tensors into one buffer. The footer's CRC covers the
header, whose per-tensor CRCs cover the payload (in version 2, each tensor's
padding too): nothing is trusted before it is verified, and every length read
from the file is bounded by the file's own size (or, for decompressed sizes,
by the model the state is loaded into).

Version 2 aligns the tensors so that the writer can hand the snapshot's
page-aligned buffers to O_DIRECT as they are, without a bounce copy
(`snapshot.HostSnapshot.allocate`, `native/atomic_file.c`); readers read
both versions.

The flags say what kind of file it is. 0: a whole checkpoint. A
multi-process job (`stores.parts`) writes one file per process with `FLAG_PART`,
whose tensors are that process's shards (each entry then carries the
variable's global shape and the shard's start), and commits them with a
file of `FLAG_MANIFEST` that holds no tensor, only the training position
and the list of parts. A reader that predates a flag refuses the file
instead of misreading it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import mmap
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, Protocol

import msgpack
import numpy as np
import zstandard

from fastbackup._compat import native
from fastbackup.errors import CheckpointCorruptError

log = logging.getLogger("fastbackup")

MAGIC = b"\x89FBKP\r\n\x1a"
FOOTER_MAGIC = b"FBKPEND\n"
VERSION = 2
# Versions this reader accepts; version 1 has no alignment.
READABLE_VERSIONS = (1, 2)
# Version 2's tensor alignment: the page size, which is also a multiple of
# every common logical block size (512, 4096) that O_DIRECT requires.
ALIGNMENT = 4096
_PREFIX = struct.Struct("<8sII")
_FOOTER = struct.Struct("<QQIIII8s")
PREFIX_SIZE = _PREFIX.size
FOOTER_SIZE = _FOOTER.size

MAX_HEADER_BYTES = 256 * 1024 * 1024
MAX_TENSORS = 1_000_000
MAX_RANK = 32
# Names are keys of our own making; anything else in a file is hostile. A
# shard in a part adds ":<ordinal>" to its variable's name.
_NAME_RE = re.compile(r"^(model|optimizer|metrics|extra)\.[0-9]{1,9}$")
_SHARD_NAME_RE = re.compile(
    r"^(model|optimizer|metrics|extra)\.[0-9]{1,9}:[0-9]{1,6}$"
)
# File kinds (the prefix's flags; version 2 only).
FLAG_PART = 1
FLAG_MANIFEST = 2
_KNOWN_FLAGS = (0, FLAG_PART, FLAG_MANIFEST)
# A manifest names at most this many parts (one per process).
MAX_PARTS = 1 << 16
_PART_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
        "uint32", "uint64", "float16", "float32", "float64", "complex64",
        "complex128",
    )
}
try:  # Keras depends on ml_dtypes; bfloat16 and float8 variables need it.
    import ml_dtypes

    for _name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        _DTYPES[_name] = np.dtype(getattr(ml_dtypes, _name))
except ImportError:  # pragma: no cover - keras always brings ml_dtypes
    pass

# Compression is attempted only on tensors at least this large; smaller
# ones cost more in per-frame overhead than they can save.
_MIN_COMPRESS_BYTES = 64 * 1024
_SAMPLE_BYTES = 64 * 1024


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    """`n` rounded up to a multiple of `alignment`."""
    return -(-n // alignment) * alignment


_ZEROS = bytes(ALIGNMENT)


def dtype_from_name(name: str) -> np.dtype:
    """Maps a stored dtype name to numpy, refusing anything unexpected."""
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unsupported dtype {name!r}") from None


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor as described by a checkpoint header."""

    name: str
    path: str
    dtype: str
    shape: tuple[int, ...]
    codec: str
    offset: int
    stored_size: int
    raw_size: int
    crc32c: int
    # Zero bytes after the stored ones, covered by `crc32c` (version 2).
    padding: int = 0
    # For a shard (in a part): the variable's global shape, and where the
    # shard starts in it; `None` for a whole tensor.
    global_shape: tuple[int, ...] | None = None
    start: tuple[int, ...] | None = None

    @property
    def np_dtype(self) -> np.dtype:
        return dtype_from_name(self.dtype)

    @property
    def variable(self) -> str:
        """The saved variable's name ("model.3"), shard ordinal dropped."""
        return self.name.partition(":")[0]

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The variable's shape (the tensor's own for a whole tensor)."""
        return self.shape if self.global_shape is None else self.global_shape

    @property
    def offsets(self) -> tuple[int, ...]:
        """Where this tensor starts in its variable (zeros when whole)."""
        return self.start if self.start is not None else (0,) * len(self.shape)


class CompressionPolicy:
    """Decides per tensor whether zstd pays, given the disk's speed.

    Compressing costs CPU time on one of the machine's cores; it pays only
    when `t_compress + size / (ratio * disk) < size / disk`. A 192 KiB sample
    of each large tensor gives the ratio and the speed; the disk's speed is
    the one the writer measured on its previous checkpoint. Dense float32
    weights (ratio ~1.08 at 0.3-0.5 GB/s) are therefore stored raw on a
    0.5 GB/s disk, while zeros, masks and low-entropy tensors are compressed.

    Args:
        level: zstd level, or `None` to store everything raw.
        disk_bytes_per_s: initial estimate of the durable write speed.
    """

    def __init__(self, level: int | None, disk_bytes_per_s: float = 0.5e9):
        self.level = level
        self.disk_bytes_per_s = disk_bytes_per_s
        self._cctx = (
            zstandard.ZstdCompressor(
                level=level, write_content_size=True, write_checksum=False
            )
            if level is not None
            else None
        )

    def observe_write(self, nbytes: int, seconds: float) -> None:
        """Updates the disk speed estimate from a completed write."""
        if nbytes >= 1 << 20 and seconds > 0:
            self.disk_bytes_per_s = nbytes / seconds

    def _pays(self, data: memoryview) -> bool:
        n = len(data)
        if n <= 3 * _SAMPLE_BYTES:
            sample = bytes(data)
        else:
            mid = n // 2
            sample = b"".join(
                (
                    data[:_SAMPLE_BYTES],
                    data[mid : mid + _SAMPLE_BYTES],
                    data[n - _SAMPLE_BYTES :],
                )
            )
        start = time.perf_counter()
        compressed = self._cctx.compress(sample)  # type: ignore[union-attr]
        elapsed = max(time.perf_counter() - start, 1e-7)
        ratio = len(sample) / max(len(compressed), 1)
        speed = len(sample) / elapsed
        disk = self.disk_bytes_per_s
        t_compressed = n / speed + n / (ratio * disk)
        # A margin so that noise in the sample never makes us slower.
        return t_compressed < 0.8 * (n / disk)

    def encode(self, data: memoryview) -> tuple[str, Any]:
        """Returns `(codec, stored bytes)` for one tensor's raw bytes."""
        if self._cctx is None or len(data) < _MIN_COMPRESS_BYTES:
            return "raw", data
        if not self._pays(data):
            return "raw", data
        compressed = self._cctx.compress(data)
        if len(compressed) >= len(data):
            return "raw", data
        return "zstd", compressed


@dataclasses.dataclass
class EncodedCheckpoint:
    """A checkpoint ready to be streamed: prefix and payload, header later.

    The header holds each tensor's CRC, which the native writer computes
    while it writes the payload; `trailer()` then builds header and footer.
    A tensor is one segment, or two when its padding could not come from
    its buffer: `entries[i]["segment"]` is the index of its first one and
    `entries[i]["pad"]` the zero bytes that follow it in a segment of its
    own, which its CRC continues over.

    `known_crcs[i]` is segment i's CRC-32C where the snapshot's copy
    already computed it (`HostSnapshot.crcs`), so the store need not read
    that segment twice; `None` where the store must checksum it.
    """

    segments: list[Any]
    entries: list[dict[str, Any]]
    meta: dict[str, Any]
    payload_end: int
    known_crcs: list[int | None] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.known_crcs) > len(self.segments):
            raise ValueError(
                f"known_crcs has {len(self.known_crcs)} entries for "
                f"{len(self.segments)} segments"
            )
        self.known_crcs = list(self.known_crcs) + [None] * (
            len(self.segments) - len(self.known_crcs)
        )

    def trailer(self, crcs: list[int]) -> bytes:
        """Builds header and footer from the payload segments' CRCs."""
        if len(crcs) != len(self.segments):
            raise ValueError(
                f"expected {len(self.segments)} checksums, got {len(crcs)}"
            )
        tensors = []
        for e in self.entries:
            crc = crcs[e["segment"]]
            if e["pad"]:
                crc = native.crc32c(_ZEROS[: e["pad"]], crc)
            fields = [e["name"], e["path"], e["dtype"], list(e["shape"]),
                      e["codec"], e["offset"], e["stored_size"], e["raw_size"],
                      crc]
            if e.get("shard") is not None:
                fields.append(e["shard"])
            tensors.append(fields)
        header = msgpack.packb(
            {**self.meta, "tensors": tensors}, use_bin_type=True
        )
        header_crc = native.crc32c(header)
        head = struct.pack(
            "<QQII", self.payload_end, len(header), header_crc, VERSION
        )
        footer = _FOOTER.pack(
            self.payload_end, len(header), header_crc, VERSION,
            native.crc32c(head), 0, FOOTER_MAGIC,
        )
        return header + footer


class TensorLayout(Protocol):
    """What `encode` reads of one tensor's description."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def dtype(self) -> np.dtype: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def global_shape(self) -> tuple[int, ...] | None: ...
    @property
    def start(self) -> tuple[int, ...] | None: ...


class Encodable(Protocol):
    """What `encode` reads of a snapshot: tensors, their layout, position.

    Declared here so that the format depends on no producer of snapshots:
    `snapshot.HostSnapshot` is the one the writer hands in.
    """

    @property
    def specs(self) -> Sequence[TensorLayout]: ...
    @property
    def arrays(self) -> Sequence[np.ndarray]: ...
    @property
    def epoch(self) -> int: ...
    @property
    def batch(self) -> int: ...
    @property
    def taken_at(self) -> float: ...
    @property
    def metadata(self) -> dict[str, Any]: ...
    @property
    def part(self) -> tuple[int, int] | None: ...

    def padded_region(self, index: int) -> memoryview | None:
        """Tensor `index`'s bytes and zero padding to a page multiple,
        page-aligned, or `None` (see `HostSnapshot.padded_region`)."""

    def copied_crc32c(self, index: int) -> int | None:
        """Tensor `index`'s CRC-32C taken while it was copied, or `None`
        (see `HostSnapshot.crcs`)."""


def encode(
    snapshot: Encodable, policy: CompressionPolicy, step: int
) -> EncodedCheckpoint:
    """Prepares a snapshot for streaming; runs on the writer thread.

    A raw tensor whose buffer is page-aligned and padded with zeros to a
    page multiple (`HostSnapshot.allocate`) is one segment, padding
    included, that the native writer can hand to O_DIRECT as it is; any
    other tensor is its stored bytes plus a segment of zeros.

    Args:
        snapshot: the host copy of the state.
        policy: decides the codec of each tensor.
        step: the checkpoint's sequence number.

    Returns:
        The segments to write (prefix first) and what the header needs.
    """
    part = snapshot.part
    segments: list[Any] = [_prefix(FLAG_PART if part is not None else 0)]
    known_crcs: list[int | None] = [None]
    entries: list[dict[str, Any]] = []
    offset = ALIGNMENT
    for index, (spec, array) in enumerate(zip(snapshot.specs, snapshot.arrays)):
        # A uint8 view, not memoryview(array): the buffer protocol has no
        # format code for ml_dtypes types (bfloat16, float8).
        codec, stored = policy.encode(memoryview(array.reshape(-1).view(np.uint8)))
        stored_size = len(stored)
        slot = align_up(stored_size)
        region = snapshot.padded_region(index) if codec == "raw" else None
        entries.append(
            {
                "name": spec.name,
                "path": spec.path,
                "dtype": spec.dtype.name,
                "shape": spec.shape,
                "codec": codec,
                "offset": offset,
                "stored_size": stored_size,
                "raw_size": spec.nbytes,
                "segment": len(segments),
                "pad": 0 if region is not None else slot - stored_size,
                "shard": (
                    [list(spec.global_shape), list(spec.start or ())]
                    if spec.global_shape is not None
                    else None
                ),
            }
        )
        copied = snapshot.copied_crc32c(index) if codec == "raw" else None
        if region is not None:
            segments.append(region)
            # The padding is read from the buffer, as it is written.
            known_crcs.append(
                None if copied is None
                else native.crc32c(region[stored_size:], copied)
            )
        else:
            segments.append(stored)
            known_crcs.append(copied)
            if slot != stored_size:
                segments.append(_ZEROS[: slot - stored_size])
                known_crcs.append(None)
        offset += slot
    meta = {
        "format": VERSION,
        "step": int(step),
        "epoch": int(snapshot.epoch),
        "batch": int(snapshot.batch),
        "created": float(snapshot.taken_at),
        "extra": snapshot.metadata,
    }
    if part is not None:
        meta["part"] = {"index": int(part[0]), "count": int(part[1])}
        meta["flags"] = FLAG_PART
    return EncodedCheckpoint(segments, entries, meta, offset, known_crcs)


def _prefix(flags: int) -> bytes:
    return _PREFIX.pack(MAGIC, VERSION, flags) + bytes(ALIGNMENT - PREFIX_SIZE)


def encode_manifest(
    meta: dict[str, Any], parts: list[dict[str, Any]]
) -> EncodedCheckpoint:
    """The commit record of a multi-process checkpoint: a file of no tensor.

    Args:
        meta: the training position and metadata, as in a part's header
            (`step`, `epoch`, `batch`, `created`, `extra`).
        parts: one `{"name", "size"}` per process, in process order: the
            part files, and their sizes as written.

    Returns:
        A checkpoint to commit under the step's own name: it becomes the
        checkpoint, and the parts with it.
    """
    head = {k: v for k, v in meta.items() if k not in ("part", "tensors")}
    head["flags"] = FLAG_MANIFEST
    head["parts"] = [
        {"name": str(p["name"]), "size": int(p["size"])} for p in parts
    ]
    return EncodedCheckpoint([_prefix(FLAG_MANIFEST)], [], head, ALIGNMENT)


def _corrupt(path: str, reason: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(path, reason)


def _entry(
    path: str, index: int, raw: Any, version: int, flags: int = 0
) -> TensorEntry:
    where = f"tensor #{index}"
    # A part's entries carry a tenth field: [global shape, start].
    fields = 10 if flags == FLAG_PART else 9
    if not isinstance(raw, list) or len(raw) != fields:
        raise _corrupt(path, f"{where}: malformed entry")
    name, vpath, dtype, shape, codec, offset, stored, size, crc = raw[:9]
    names = _SHARD_NAME_RE if flags == FLAG_PART else _NAME_RE
    if not isinstance(name, str) or not names.match(name):
        raise _corrupt(path, f"{where}: invalid tensor name {name!r}")
    if (
        not isinstance(vpath, str)
        or len(vpath) > 4096
        or "\x00" in vpath
        or ".." in vpath.split("/")
        or vpath.startswith("/")
    ):
        raise _corrupt(path, f"{where} ({name}): invalid variable path")
    try:
        np_dtype = dtype_from_name(dtype)
    except ValueError as e:
        raise _corrupt(path, f"{where} ({name}): {e}") from None
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and 0 <= d < 1 << 48 for d in shape)
    ):
        raise _corrupt(path, f"{where} ({name}): invalid shape {shape!r}")
    if codec not in ("raw", "zstd"):
        raise _corrupt(path, f"{where} ({name}): unknown codec {codec!r}")
    ints = (offset, stored, size, crc)
    if not all(isinstance(x, int) and x >= 0 for x in ints) or crc >= 1 << 32:
        raise _corrupt(path, f"{where} ({name}): invalid sizes or checksum")
    count = 1
    for d in shape:
        count *= d
    if count * np_dtype.itemsize != size:
        raise _corrupt(
            path,
            f"{where} ({name}): size {size} does not match shape {shape} "
            f"and dtype {dtype}",
        )
    if codec == "raw" and stored != size:
        raise _corrupt(path, f"{where} ({name}): raw tensor of wrong size")
    padding = align_up(stored) - stored if version >= 2 else 0
    global_shape = start = None
    if fields == 10:
        global_shape, start = _shard(path, f"{where} ({name})", raw[9], shape)
    return TensorEntry(
        name, vpath, dtype, tuple(shape), codec, offset, stored, size, crc,
        padding, global_shape, start,
    )


def _shard(
    path: str, where: str, raw: Any, shape: list[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validates a shard's `[global shape, start]`: inside the variable."""
    ok = isinstance(raw, list) and len(raw) == 2 and all(
        isinstance(v, list) and len(v) == len(shape)
        and all(isinstance(d, int) and 0 <= d < 1 << 48 for d in v)
        for v in raw
    )
    if not ok or any(
        s + n > g for s, n, g in zip(raw[1], shape, raw[0])
    ):
        raise _corrupt(path, f"{where}: invalid shard placement {raw!r}")
    return tuple(raw[0]), tuple(raw[1])


class CheckpointReader:
    """Reads and verifies one checkpoint file.

    Opening parses and verifies footer and header (their checksums and every
    bound); tensor bytes are verified as they are read, before anything
    reaches a model.

    Args:
        path: the checkpoint file (or, with `file`, its name in messages).
        file: an open binary file to read instead of opening `path`; the
            reader owns it. Defaults to `None`.

    Raises:
        CheckpointCorruptError: the file is not a valid checkpoint.
        OSError: the file cannot be opened or read.
    """

    def __init__(
        self, path: str | os.PathLike[str], file: BinaryIO | None = None
    ) -> None:
        self.path = os.fspath(path)
        self._file: BinaryIO = open(self.path, "rb") if file is None else file
        self._map: mmap.mmap | None = None
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._map is not None:
            mapping, self._map = self._map, None
            try:
                mapping.close()
            except BufferError:
                # A view from `verified_view` is still alive (e.g. in the
                # traceback of an error being raised): the mapping is then
                # unmapped when the last view is collected.
                log.debug("checkpoint %s stays mapped until its last view "
                          "is collected", self.path)
        self._file.close()

    def _size(self) -> int:
        return os.fstat(self._file.fileno()).st_size

    def _begin_fetch(self, entries: Sequence[TensorEntry]) -> None:
        """Starts reading `entries` ahead of their use (see `fetch`).

        A file is mapped, and read by the kernel as its views are used:
        nothing to do. `RangedCheckpointReader` sends its requests here.
        """

    def _finish_fetch(self) -> None:
        """Waits for what `_begin_fetch` started."""

    def fetch(self, entries: Sequence[TensorEntry]) -> None:
        """Reads `entries` ahead of their use (nothing to do for a file)."""

    def _read_exact(self, offset: int, size: int) -> bytes:
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise _corrupt(self.path, "file is truncated")
        return data

    def _parse(self) -> None:
        path = self.path
        self.file_size = self._size()
        if self.file_size < PREFIX_SIZE + FOOTER_SIZE:
            raise _corrupt(path, f"file is too short ({self.file_size} bytes)")
        magic, version, flags = _PREFIX.unpack(self._read_exact(0, PREFIX_SIZE))
        if magic != MAGIC:
            raise _corrupt(path, "not a fastbackup checkpoint (bad magic)")
        if version not in READABLE_VERSIONS:
            readable = ", ".join(str(v) for v in READABLE_VERSIONS)
            raise _corrupt(
                path,
                f"format version {version} is not supported (this fastbackup "
                f"reads versions {readable}); upgrade fastbackup",
            )
        self.version: int = version
        # A flag this reader does not know could change the meaning of
        # what follows, so it is refused, not ignored. Version 1 has none.
        if flags not in _KNOWN_FLAGS or (version < 2 and flags):
            raise _corrupt(path, f"unknown format flags {flags:#x}")
        self.flags: int = flags
        footer = self._read_exact(self.file_size - FOOTER_SIZE, FOOTER_SIZE)
        h_off, h_len, h_crc, f_version, f_crc, reserved, f_magic = (
            _FOOTER.unpack(footer)
        )
        if f_magic != FOOTER_MAGIC:
            raise _corrupt(path, "footer missing: the file is truncated")
        if native.crc32c(footer[:24]) != f_crc or f_version != version:
            raise _corrupt(path, "footer checksum mismatch")
        if reserved != 0:
            raise _corrupt(path, "footer reserved field is not zero")
        # Version 2's payload starts after the prefix's padding.
        first = ALIGNMENT if version >= 2 else PREFIX_SIZE
        if (
            h_off < first
            or h_len > MAX_HEADER_BYTES
            or h_off + h_len + FOOTER_SIZE != self.file_size
        ):
            raise _corrupt(path, "header bounds do not fit the file")
        padding = self._read_exact(PREFIX_SIZE, first - PREFIX_SIZE)
        if padding.count(0) != len(padding):
            # No checksum covers these bytes: their value is the check.
            raise _corrupt(path, "prefix padding is not zero")
        header = self._read_exact(h_off, h_len)
        if native.crc32c(header) != h_crc:
            raise _corrupt(path, "header checksum mismatch")
        try:
            meta = msgpack.unpackb(header, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several unrelated types
            raise _corrupt(path, f"header cannot be decoded: {e}") from None
        if not isinstance(meta, dict):
            raise _corrupt(path, "header is not a map")
        for key in ("step", "epoch", "batch"):
            if not isinstance(meta.get(key), int) or meta[key] < 0:
                raise _corrupt(path, f"header field {key!r} is invalid")
        # No checksum covers the prefix: the header, which one does, says
        # the flags again, so that a damaged flag cannot change the file's
        # kind.
        if meta.get("flags", 0) != flags:
            raise _corrupt(path, "prefix flags disagree with the header")
        tensors = meta.pop("tensors", None)
        if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
            raise _corrupt(path, "header has no valid tensor list")
        if not isinstance(meta.get("extra", {}), dict):
            raise _corrupt(path, "header field 'extra' is invalid")
        entries = [
            _entry(path, i, t, version, flags) for i, t in enumerate(tensors)
        ]
        self.parts: list[dict[str, Any]] = []
        self.part: tuple[int, int] | None = None
        if flags == FLAG_MANIFEST:
            if entries:
                raise _corrupt(path, "a manifest holds no tensor")
            self.parts = _parts(path, meta.get("parts"))
        elif flags == FLAG_PART:
            self.part = _part_position(path, meta.get("part"))
        expected = first
        names: set[str] = set()
        for e in entries:
            if e.offset != expected:
                raise _corrupt(path, f"tensor {e.name}: payload offset mismatch")
            if e.name in names:
                raise _corrupt(path, f"tensor {e.name} appears twice")
            names.add(e.name)
            expected += e.stored_size + e.padding
        if expected != h_off:
            raise _corrupt(path, "payload size does not match the header")
        self.meta: dict[str, Any] = meta
        self.entries: list[TensorEntry] = entries

    @property
    def is_manifest(self) -> bool:
        """True for the commit record of a multi-process checkpoint."""
        return self.flags == FLAG_MANIFEST

    @property
    def is_part(self) -> bool:
        """True for one process's part of a multi-process checkpoint."""
        return self.flags == FLAG_PART

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])

    @property
    def batch(self) -> int:
        return int(self.meta["batch"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def read_tensor(self, entry: TensorEntry, out: np.ndarray) -> None:
        """Reads, verifies and decodes one tensor into `out`.

        Args:
            entry: one of `self.entries`.
            out: a C-contiguous array of the entry's dtype and shape.

        Raises:
            CheckpointCorruptError: checksum or size mismatch.
        """
        if out.nbytes != entry.raw_size or not out.flags.c_contiguous:
            raise ValueError(
                f"output buffer does not fit tensor {entry.name}: "
                f"{out.nbytes} bytes for {entry.raw_size}"
            )
        self._file.seek(entry.offset)
        if entry.codec == "raw":
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = self._file.readinto(view) if out.size else 0
            if got != entry.raw_size:
                raise _corrupt(self.path, "file is truncated")
            crc = native.crc32c(view)
            if entry.padding:
                crc = native.crc32c(self._read_padding(entry), crc)
            if crc != entry.crc32c:
                raise _corrupt(
                    self.path, f"checksum mismatch in tensor {entry.name}"
                )
            return
        stored = self._read_stored(entry)
        _decompress_into(self.path, entry, stored, out)

    def _read_padding(self, entry: TensorEntry) -> bytes:
        # Follows the stored bytes just read; fewer than ALIGNMENT bytes.
        padding = self._file.read(entry.padding)
        if len(padding) != entry.padding:
            raise _corrupt(self.path, "file is truncated")
        return padding

    def _read_stored(self, entry: TensorEntry) -> bytes:
        """Reads a compressed tensor whole and checks its CRC.

        Reads from the current position; in version 2 the CRC covers the
        padding that follows the stored bytes too.
        """
        stored = self._file.read(entry.stored_size)
        if len(stored) != entry.stored_size:
            raise _corrupt(self.path, "file is truncated")
        crc = native.crc32c(stored)
        if entry.padding:
            crc = native.crc32c(self._read_padding(entry), crc)
        if crc != entry.crc32c:
            raise _corrupt(self.path, f"checksum mismatch in tensor {entry.name}")
        return stored

    def verified_view(self, entry: TensorEntry) -> np.ndarray:
        """Returns one tensor's value, checksum verified, without a copy.

        A raw tensor is a read-only view of the file, mapped into memory:
        the file is read once (into the page cache, by the kernel's
        readahead), and no anonymous memory is allocated for it. Checkpoint
        files are never modified in place (new ones are renamed in), so the
        mapping stays valid. A compressed tensor is decoded into a new array.
        Drop every view before `close()`.

        Raises:
            CheckpointCorruptError: checksum or size mismatch.
        """
        if entry.codec != "raw" or entry.raw_size == 0:
            out = np.empty(entry.shape, dtype=entry.np_dtype)
            self.read_tensor(entry, out)
            return out
        if self._map is None:
            self._map = mmap.mmap(
                self._file.fileno(), 0, access=mmap.ACCESS_READ
            )
            self._map.madvise(mmap.MADV_SEQUENTIAL)
        region = np.frombuffer(
            self._map, dtype=np.uint8, count=entry.raw_size + entry.padding,
            offset=entry.offset,
        )
        if native.crc32c(region) != entry.crc32c:
            raise _corrupt(self.path, f"checksum mismatch in tensor {entry.name}")
        return region[: entry.raw_size].view(entry.np_dtype).reshape(entry.shape)

    def verify(self) -> None:
        """Verifies every tensor's checksum and decoded size, streaming.

        Memory stays bounded whatever the header claims, so this is safe on
        a file of unknown origin (the CLI's `verify`).
        """
        chunk = 8 << 20
        for e in self.entries:
            self._file.seek(e.offset)
            if e.codec == "zstd":
                # Compressed tensors are small by construction (they are
                # compressed only when that pays); read them whole.
                _check_decoded_size(self.path, e, self._read_stored(e))
                continue
            crc = 0
            remaining = e.stored_size + e.padding
            while remaining:
                data = self._file.read(min(chunk, remaining))
                if not data:
                    raise _corrupt(self.path, "file is truncated")
                remaining -= len(data)
                crc = native.crc32c(data, crc)
            if crc != e.crc32c:
                raise _corrupt(self.path, f"checksum mismatch in tensor {e.name}")


def _check_decoded_size(path: str, entry: TensorEntry, stored: Any) -> None:
    """Decodes a compressed tensor in bounded chunks to check its size."""
    _check_frame_size(path, entry, stored)
    produced = 0
    reader = zstandard.ZstdDecompressor().stream_reader(stored)
    try:
        while part := reader.read(8 << 20):
            produced += len(part)
            if produced > entry.raw_size:
                break
    except zstandard.ZstdError as err:
        raise _corrupt(path, f"tensor {entry.name}: {err}") from None
    if produced != entry.raw_size:
        raise _corrupt(path, f"tensor {entry.name} decompresses to a wrong size")


class RangeSource(Protocol):
    """One stored object, read by concurrent ranged requests.

    Declared here so that the format depends on no store:
    `stores.object_store` implements it for an object in a bucket.
    """

    @property
    def size(self) -> int:
        """The object's size in bytes."""

    @property
    def chunk_bytes(self) -> int:
        """The length of one request that keeps the connection busy."""

    def submit(
        self, start: int, length: int, arrived: Callable[[Any], Any]
    ) -> concurrent.futures.Future[Any]:
        """Reads bytes `[start, start + length)` on a reading thread.

        `arrived` is called on that thread with the bytes (a read-only
        buffer); the future's result is what it returns.
        """


# The end of an object read when it is opened: the footer and, unless the
# model has some thousands of tensors, the whole header in one request.
TAIL_BYTES = 256 << 10


class RangedCheckpointReader(CheckpointReader):
    """Reads and verifies one checkpoint stored as an object, by ranges.

    Opening reads the prefix and the end of the object (footer and header)
    with two concurrent requests and verifies them as `CheckpointReader`
    does; with `whole`, it reads the whole object instead, in concurrent
    requests of `source.chunk_bytes` (as few requests as a plain parallel
    download, with no round trip for the header before them), and `fetch`
    then only verifies. The tensors are then read only when asked for (`fetch`, or a
    view of one not fetched): in requests of about `source.chunk_bytes` cut
    at tensor boundaries, all in flight at once, each tensor's checksum
    verified on the reading thread as its bytes land, so that the checks
    overlap the transfer and nothing is read twice. The buffers the client
    returns are kept as they are (no copy); a tensor longer than one
    request is assembled in an array of its own. A multi-process job's
    process thereby reads, of each part, only the shards it holds.

    Args:
        path: the object's URL, for messages.
        source: the object's bytes.
        whole: read every byte at opening, for a reader that will need
            them all. Defaults to `False`.

    Raises:
        CheckpointCorruptError: the object is not a valid checkpoint.
        OSError: it cannot be read.
    """

    def __init__(self, path: str, source: RangeSource,
                 whole: bool = False) -> None:
        self.path = path
        self._source = source
        self._map = None
        self._lock = threading.Lock()
        self._pending: list[concurrent.futures.Future[Any]] = []
        # Entry name -> its verified stored bytes and padding (uint8).
        self._ready: dict[str, np.ndarray] = {}
        self._asked: set[str] = set()
        # (start, bytes) of the prefix and the end of the object.
        self._cache: list[tuple[int, Any]] = []
        try:
            size = source.size
            if size >= PREFIX_SIZE + FOOTER_SIZE:
                if whole:
                    chunk = source.chunk_bytes
                    starts = list(range(0, size, chunk))
                else:
                    tail = max(0, size - TAIL_BYTES)
                    starts = [0, tail] if tail >= ALIGNMENT else [0]
                ends = starts[1:] + [size]
                if not whole:
                    ends[0] = min(ALIGNMENT, size)
                self._pending = [
                    source.submit(a, b - a, _same) for a, b in zip(starts, ends)
                ]
                self._cache = [
                    (a, f.result()) for a, f in zip(starts, self._pending)
                ]
                self._pending = []
            self._parse()
        except BaseException:
            self.close()
            raise

    def _size(self) -> int:
        return self._source.size

    def close(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            f.cancel()
        # A read still running writes into this reader's buffers.
        concurrent.futures.wait(pending)
        self._ready = {}
        self._asked = set()
        self._cache = []

    def _cached(self, offset: int, size: int) -> np.ndarray | None:
        """Bytes `[offset, offset + size)` from what was read at opening: a
        view when one read holds them, a copy when they straddle reads."""
        if size == 0:
            return np.empty(0, np.uint8)
        pieces = []
        at = offset
        for start, data in self._cache:
            end = start + len(data)
            if start <= at < end:
                n = min(end, offset + size) - at
                pieces.append(np.frombuffer(data, np.uint8, n, at - start))
                at += n
            if at == offset + size:
                break
        if at != offset + size or not pieces:
            return None
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _read_exact(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > self.file_size:
            raise _corrupt(self.path, "file is truncated")
        cached = self._cached(offset, size)
        if cached is not None:
            return cached.tobytes()
        data = self._source.submit(offset, size, bytes).result()
        if len(data) != size:
            raise _corrupt(self.path, "file is truncated")
        return data

    # Tensors ---------------------------------------------------------

    def _begin_fetch(self, entries: Sequence[TensorEntry]) -> None:
        """Sends the requests for `entries` not read yet; returns at once."""
        todo = sorted(
            {e.name: e for e in entries if e.name not in self._asked}.values(),
            key=lambda e: e.offset,
        )
        chunk = self._source.chunk_bytes
        run: list[TensorEntry] = []

        def send() -> None:
            if run:
                start = run[0].offset
                end = run[-1].offset + run[-1].stored_size + run[-1].padding
                group = tuple(run)
                self._pending.append(self._source.submit(
                    start, end - start,
                    lambda data: self._landed(group, start, end - start, data),
                ))
                run.clear()

        for e in todo:
            self._asked.add(e.name)
            span = e.stored_size + e.padding
            cached = self._cached(e.offset, span)
            if cached is not None:
                # Read whole at opening: the checksum now, on this thread.
                self._check(e, cached)
                continue
            if span > chunk:
                send()
                self._assemble(e, span, chunk)
                continue
            if run and (
                e.offset != run[-1].offset + run[-1].stored_size + run[-1].padding
                or e.offset + span - run[0].offset > chunk
            ):
                send()
            run.append(e)
        send()

    def _finish_fetch(self) -> None:
        """Waits for every request sent; raises the first error."""
        pending, self._pending = self._pending, []
        try:
            for f in pending:
                f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            concurrent.futures.wait(pending)
            raise

    def fetch(self, entries: Sequence[TensorEntry]) -> None:
        """Reads and verifies `entries`, all requests in flight at once.

        Raises:
            CheckpointCorruptError: a tensor fails its checksum.
            OSError: the object cannot be read.
        """
        try:
            self._begin_fetch(entries)
        finally:
            self._finish_fetch()

    def _check(self, entry: TensorEntry, region: np.ndarray) -> None:
        if native.crc32c(region) != entry.crc32c:
            raise _corrupt(self.path, f"checksum mismatch in tensor {entry.name}")
        with self._lock:
            self._ready[entry.name] = region

    def _landed(self, group: tuple[TensorEntry, ...], start: int, length: int,
                data: Any) -> None:
        # On a reading thread: the CRC releases the GIL.
        if len(data) != length:
            raise _corrupt(self.path, "file is truncated")
        view = np.frombuffer(data, np.uint8)
        for e in group:
            at = e.offset - start
            self._check(e, view[at:at + e.stored_size + e.padding])

    def _assemble(self, entry: TensorEntry, span: int, chunk: int) -> None:
        out = np.empty(span, np.uint8)
        left = [-(-span // chunk)]

        def landed(at: int, n: int, data: Any) -> None:
            if len(data) != n:
                raise _corrupt(self.path, "file is truncated")
            out[at:at + n] = np.frombuffer(data, np.uint8)
            with self._lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._check(entry, out)

        for at in range(0, span, chunk):
            n = min(chunk, span - at)
            self._pending.append(self._source.submit(
                entry.offset + at, n,
                lambda data, at=at, n=n: landed(at, n, data),
            ))

    def _stored(self, entry: TensorEntry) -> np.ndarray:
        """The verified stored bytes of `entry`, read now if need be."""
        if entry.name not in self._ready:
            self._asked.discard(entry.name)
            self.fetch([entry])
        return self._ready[entry.name]

    def verified_view(self, entry: TensorEntry) -> np.ndarray:
        """One tensor's value, checksum verified: a read-only view of the
        bytes read for a raw tensor, a new array for a compressed one.

        Raises:
            CheckpointCorruptError: checksum or size mismatch.
        """
        stored = self._stored(entry)
        if entry.codec == "raw":
            if entry.stored_size != entry.raw_size:
                raise _corrupt(self.path, f"tensor {entry.name}: size mismatch")
            value = stored[:entry.raw_size].view(entry.np_dtype)
            return value.reshape(entry.shape)
        out = np.empty(entry.shape, dtype=entry.np_dtype)
        _decompress_into(self.path, entry, stored[:entry.stored_size].tobytes(),
                         out)
        return out

    def read_tensor(self, entry: TensorEntry, out: np.ndarray) -> None:
        if out.nbytes != entry.raw_size or not out.flags.c_contiguous:
            raise ValueError(
                f"output buffer does not fit tensor {entry.name}: "
                f"{out.nbytes} bytes for {entry.raw_size}"
            )
        value = self.verified_view(entry)
        np.copyto(out.reshape(-1).view(np.uint8),
                  value.reshape(-1).view(np.uint8))

    def verify(self) -> None:
        """Verifies every tensor's checksum and decoded size.

        Reads the object in batches, each dropped once checked, so that
        memory stays bounded whatever its size.
        """
        batch: list[TensorEntry] = []
        budget = 8 * self._source.chunk_bytes
        for i, e in enumerate(self.entries):
            batch.append(e)
            if (i + 1 == len(self.entries)
                    or sum(x.stored_size + x.padding for x in batch) >= budget):
                self.fetch(batch)
                for x in batch:
                    if x.codec == "zstd":
                        stored = self._ready[x.name][:x.stored_size].tobytes()
                        _check_decoded_size(self.path, x, stored)
                    self._ready.pop(x.name)
                    self._asked.discard(x.name)
                batch = []


def _same(data: Any) -> Any:
    return data


def fetch(wanted: Sequence[tuple[CheckpointReader, Sequence[TensorEntry]]]) -> None:
    """Reads ahead the tensors `wanted` of several readers, concurrently.

    Every reader's requests are sent before any is waited for, so that the
    parts of a multi-process checkpoint are read side by side. A file's
    reader has nothing to do (it is mapped).

    Raises:
        CheckpointCorruptError: a tensor fails its checksum.
        OSError: a stored object cannot be read.
    """
    try:
        for reader, entries in wanted:
            reader._begin_fetch(entries)  # noqa: SLF001
    finally:
        error: BaseException | None = None
        for reader, _ in wanted:
            try:
                reader._finish_fetch()  # noqa: SLF001
            except BaseException as e:  # every reader's reads must end
                error = error or e
        if error is not None:
            raise error


def _parts(path: str, raw: Any) -> list[dict[str, Any]]:
    """Validates a manifest's list of parts."""
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_PARTS:
        raise _corrupt(path, "manifest has no valid list of parts")
    parts = []
    for i, p in enumerate(raw):
        if (
            not isinstance(p, dict)
            or not isinstance(p.get("name"), str)
            or not _PART_FILE_RE.match(p["name"])
            or not isinstance(p.get("size"), int)
            or p["size"] < 0
        ):
            raise _corrupt(path, f"manifest part #{i} is invalid")
        parts.append({"name": p["name"], "size": p["size"]})
    if len({p["name"] for p in parts}) != len(parts):
        raise _corrupt(path, "manifest names a part twice")
    return parts


def _part_position(path: str, raw: Any) -> tuple[int, int]:
    """Validates a part's `{"index", "count"}`."""
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("index"), int)
        or not isinstance(raw.get("count"), int)
        or not 0 <= raw["index"] < raw["count"] <= MAX_PARTS
    ):
        raise _corrupt(path, "part has no valid position")
    return raw["index"], raw["count"]


def _check_frame_size(path: str, entry: TensorEntry, stored: bytes) -> None:
    # python-zstandard allocates whatever the frame header declares, so the
    # declared size is checked against our own (already bounded) one first.
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as e:
        raise _corrupt(path, f"tensor {entry.name}: {e}") from None
    if declared != entry.raw_size:
        raise _corrupt(
            path,
            f"tensor {entry.name}: compressed frame declares {declared} bytes, "
            f"header says {entry.raw_size}",
        )


def _decompress_into(
    path: str, entry: TensorEntry, stored: bytes, out: np.ndarray
) -> None:
    _check_frame_size(path, entry, stored)
    try:
        data = zstandard.ZstdDecompressor().decompress(
            stored, max_output_size=entry.raw_size
        )
    except zstandard.ZstdError as e:
        raise _corrupt(path, f"tensor {entry.name}: {e}") from None
    if len(data) != entry.raw_size:
        raise _corrupt(path, f"tensor {entry.name} decompresses to a wrong size")
    np.copyto(out.reshape(-1).view(np.uint8), np.frombuffer(data, np.uint8))

