"""A consistent host-memory copy of a model's training state.

This is the only work a save does on the training thread: between two
training steps, every model, optimizer and metric variable is copied into
host buffers that are allocated once and reused (a fresh allocation per save
costs about three times the copy on this class of machine). The writer
thread then owns those buffers until the checkpoint is durable.

The copy reads each backend's own buffer without an intermediate copy where
the backend allows it (TensorFlow's `read_value()` aliases the variable; JAX
arrays are immutable; torch CPU tensors expose their storage), and drops that
alias at once: TensorFlow copies a variable before updating it in place while
another tensor still references its buffer, which would move the cost into
the next training step. An overlapped save (`take_split`, see `overlap`)
keeps the views of the trainable and optimizer variables until its
background copy is done, which the next update waits for.

Each variable is copied by the native extension's `crc32c_copy`, which
checksums the bytes as it copies them (the writer then need not read the
whole state a second time, on a core that training wants) and stores them
past the CPU cache (glibc's `memcpy` does that only above a threshold
derived from the last-level cache, which a VM may report as hundreds of
MiB: a tensor of a few MiB then costs about 1.7x a streaming copy, measured
in docs/benchmarks.md).

The buffers are anonymous memory mappings: each array starts on a page and
is followed by zeros up to the next page, exactly as the tensor lies in a
version 2 checkpoint file (`format`), so the writer hands each raw tensor to
O_DIRECT from where it is, without a bounce copy.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import keras
import numpy as np

from fastbackup import backend
from fastbackup._compat import native
from fastbackup.format import ALIGNMENT, align_up, dtype_from_name

log = logging.getLogger("fastbackup")

# Variable groups, in the order they are stored. The group and the index in
# it identify a variable across two instances of the same architecture;
# Keras's variable paths embed auto-generated layer names ("dense_3") that
# differ between instances, so they are kept for messages only.
GROUPS = ("model", "optimizer", "metrics")

# The pure-Python fallback checksums at a few MB/s: on the training thread
# that would stall every save, so there the copy is numpy's and the writer
# thread checksums, as it does for any array copied without a checksum.
_CHECKSUM_WHILE_COPYING = hasattr(native, "_crc32c_impl")


def copy_checksummed(dst: np.ndarray, src: np.ndarray) -> int | None:
    """Copies `src` into `dst` (same shape and dtype).

    Returns:
        The CRC-32C of the bytes copied where it came with the copy (both
        arrays C-contiguous, the native extension loaded), else `None`.
    """
    if (
        _CHECKSUM_WHILE_COPYING
        and dst.flags.c_contiguous
        and src.flags.c_contiguous
        and dst.shape == src.shape
        and dst.dtype == src.dtype
    ):
        # uint8 views: the buffer protocol has no format code for ml_dtypes
        # types (bfloat16, float8), and the copy is bytewise anyway.
        return native.crc32c_copy(
            dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
        )
    np.copyto(dst, src, casting="no")
    return None


# Transparent huge pages are advised for snapshot buffers at least this
# large: one fault then backs 2 MiB instead of 4 KiB (allocation and fault-in
# of fresh buffers measured in docs/benchmarks.md). Smaller mappings would
# round up to a huge page for nothing.
_HUGEPAGE_MIN_BYTES = 4 << 20


def _map_anonymous(size: int, huge_pages: bool) -> mmap.mmap:
    """A private, zero-filled, page-aligned mapping of `size` (> 0) bytes."""
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if (
        huge_pages
        and size >= _HUGEPAGE_MIN_BYTES
        and hasattr(mmap, "MADV_HUGEPAGE")
    ):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError as e:
            # A kernel built without transparent huge pages answers EINVAL;
            # the mapping works the same with small pages.
            if e.errno != errno.EINVAL:
                raise
            log.debug("transparent huge pages unavailable: %s", e)
    return mapping


def aligned_arrays(
    specs: Sequence[tuple[tuple[int, ...], np.dtype]],
    huge_pages: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Empty arrays laid out as in a version 2 file, in one mapping.

    Each array starts at a multiple of `format.ALIGNMENT` from the start of
    a fresh anonymous mapping (so on a page), and is followed by zeros up to
    the next multiple.

    Args:
        specs: `(shape, dtype)` of each array.
        huge_pages: advise transparent huge pages for a mapping of at least
            4 MiB (`MADV_HUGEPAGE`). Defaults to True.

    Returns:
        `(arrays, regions)`: the arrays, and for each the uint8 array of its
        bytes and its padding (a page multiple; empty for an empty array).
    """
    sizes = [
        int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        for shape, dtype in specs
    ]
    total = sum(align_up(n) for n in sizes)
    backing = (
        np.frombuffer(_map_anonymous(total, huge_pages), dtype=np.uint8)
        if total
        else np.zeros(0, np.uint8)
    )
    arrays, regions = [], []
    offset = 0
    for (shape, dtype), n in zip(specs, sizes):
        region = backing[offset : offset + align_up(n)]
        arrays.append(region[:n].view(dtype).reshape(shape))
        regions.append(region)
        offset += align_up(n)
    return arrays, regions


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Identity of one saved variable.

    Attributes:
        name: stable key, "<group>.<index>" (e.g. "optimizer.3"); a shard
            adds ":<ordinal>" ("model.2:1").
        path: the Keras variable path, for messages.
        dtype: numpy dtype of the host copy.
        shape: shape of the variable (of the shard, for a shard).
        global_shape: for a shard, the variable's shape; else `None`.
        start: for a shard, its start in the variable; else `None`.
    """

    name: str
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    global_shape: tuple[int, ...] | None = None
    start: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass
class HostSnapshot:
    """Host copies of every variable, plus the training position.

    Attributes:
        specs: one `TensorSpec` per array.
        arrays: the host copies, reused from one save to the next.
        regions: for each array, the page-aligned uint8 array of its bytes
            and its zero padding (see `aligned_arrays`), or `None` where the
            array is an ordinary one; may be shorter than `arrays`.
        epoch: the epoch recorded in the checkpoint (as Keras records it).
        batch: the last batch index seen in that epoch.
        metadata: extra msgpack-serialisable values saved with the state.
        taken_at: `time.time()` when the copy was taken.
        part: `(process index, process count)` when this is one process's
            part of a multi-process checkpoint (its arrays are shards);
            `None` for a whole checkpoint.
        crcs: for each array, the CRC-32C of its bytes taken as they were
            copied in, or `None` where the copy gave none (then the writer
            computes it); may be shorter than `arrays`. Whoever replaces an
            array's contents must drop its entry.
    """

    specs: list[TensorSpec]
    arrays: list[np.ndarray]
    regions: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    epoch: int = 0
    batch: int = 0
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    taken_at: float = 0.0
    part: tuple[int, int] | None = None
    crcs: list[int | None] = dataclasses.field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def copied_crc32c(self, index: int) -> int | None:
        """Array `index`'s CRC-32C as copied in, or `None` (see `crcs`)."""
        return self.crcs[index] if index < len(self.crcs) else None

    def padded_region(self, index: int) -> memoryview | None:
        """Array `index`'s bytes and zero padding, if it lies in a region.

        Returns:
            A page-aligned buffer of a page multiple, starting with the
            array's bytes, or `None` when the array is an ordinary one (or
            was replaced without its region).
        """
        region = self._region(index)
        return None if region is None else memoryview(region)

    def _region(self, index: int) -> np.ndarray | None:
        region = self.regions[index] if index < len(self.regions) else None
        if region is None:
            return None
        array = self.arrays[index]
        if (
            region.nbytes != align_up(array.nbytes)
            or region.ctypes.data != array.ctypes.data
            or region.ctypes.data % ALIGNMENT
        ):
            return None
        return region

    @classmethod
    def allocate(
        cls, specs: list[TensorSpec], huge_pages: bool = True
    ) -> HostSnapshot:
        """Allocates aligned buffers for `specs` and faults every page in.

        One byte written per page is enough for the kernel to back it; numpy
        releases the GIL for the strided write, so this can run on the
        writer thread while training goes on. Only the arrays' own bytes
        are touched: the padding stays zero.

        Args:
            specs: the layout of the state.
            huge_pages: see `aligned_arrays`. Defaults to True.
        """
        arrays, regions = aligned_arrays(
            [(s.shape, s.dtype) for s in specs], huge_pages
        )
        for array in arrays:
            if array.size:
                array.reshape(-1).view(np.uint8)[::4096] = 0
        return cls(specs=list(specs), arrays=arrays, regions=list(regions))


def collect_variables(model: keras.Model) -> list[tuple[str, Any]]:
    """Lists every variable `model.save_weights` covers, in a stable order.

    Args:
        model: a built Keras model; its optimizer, if any, must be built.

    Returns:
        `(name, variable)` pairs; names are "<group>.<index>".
    """
    groups: dict[str, Sequence[Any]] = {
        "model": model.variables,
        "optimizer": (
            model.optimizer.variables
            if getattr(model, "optimizer", None) is not None
            else ()
        ),
        "metrics": getattr(model, "metrics_variables", ()),
    }
    seen: set[int] = set()
    out: list[tuple[str, Any]] = []
    for group in GROUPS:
        for index, variable in enumerate(groups[group]):
            # A variable reachable twice (shared layers) is saved once.
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            out.append((f"{group}.{index}", variable))
    return out


def host_dtype(variable: Any) -> np.dtype:
    """The numpy dtype of a variable's host copy (bfloat16 via ml_dtypes).

    That is the dtype of the array the backend really stores, which may not
    be the declared one: JAX without `jax_enable_x64` stores a float64 or
    int64 variable as float32 or int32. What is written, and what a restore
    compares, is what is stored, so that a checkpoint restores wherever the
    stored arrays agree.
    """
    value = getattr(variable, "value", None)
    stored = getattr(value, "dtype", None)
    return dtype_from_name(
        keras.backend.standardize_dtype(
            variable.dtype if stored is None else stored
        )
    )


def _spec_of(name: str, variable: Any) -> TensorSpec:
    return TensorSpec(
        name=name,
        path=str(getattr(variable, "path", name)),
        dtype=host_dtype(variable),
        shape=tuple(int(d) for d in variable.shape),
    )


class _Piece(NamedTuple):
    """One array a snapshot copies: a variable, or one shard of it."""

    variable: Any
    read: Callable[[Any], np.ndarray]
    spec: TensorSpec


def _shard_pieces(name: str, variable: Any, process: int) -> list[_Piece]:
    """The shards of `variable` that this process writes.

    Of each distinct region of the variable exactly one copy is written in
    the whole job, by the process of its first replica, as the sharding
    assigns it (`backend.Backend.written_regions`; the rule of Orbax and
    torch DCP). An array that lives on this process's devices only (not a
    global array) is the same in every process: process 0 writes it.
    """
    framework = backend.current()
    path = str(getattr(variable, "path", name))
    dtype = host_dtype(variable)
    global_shape = tuple(int(d) for d in variable.shape)
    regions = framework.written_regions(variable)
    if regions is None:
        if process != 0:
            return []
        spec = TensorSpec(f"{name}:0", path, dtype, global_shape, global_shape,
                          (0,) * len(global_shape))
        return [_Piece(variable, framework.read_host, spec)]
    pieces = []
    for ordinal, (start, shape) in enumerate(regions):
        spec = TensorSpec(f"{name}:{ordinal}", path, dtype, shape,
                          global_shape, start)
        pieces.append(_Piece(variable, _shard_reader((start, shape)), spec))
    return pieces


def _shard_reader(region: backend.Region) -> Callable[[Any], np.ndarray]:
    """Reads this process's copy of `region` of a variable."""

    def read(variable: Any) -> np.ndarray:
        return backend.current().read_region(variable, region)

    return read


class Snapshotter:
    """Copies a model's variables into reused host buffers.

    Args:
        model: the model whose state is copied.
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self._read = backend.current().read_host
        self._variables: list[tuple[str, Any]] | None = None
        self._pieces: list[_Piece] | None = None
        # `(index, count)` of this process in a multi-process JAX job, whose
        # snapshots are parts holding this process's shards only.
        self.part = backend.current().process_part()

    def refresh(self) -> None:
        """Re-collects the variables (the optimizer may have been built)."""
        self._variables = None
        self._pieces = None

    def variables(self) -> list[tuple[str, Any]]:
        """Returns the `(name, variable)` pairs this snapshotter copies."""
        if self._variables is not None:
            return self._variables
        variables = collect_variables(self.model)
        # Backends create optimizer and compiled-metric variables in the
        # first train step; the list is final only once both exist.
        optimizer = getattr(self.model, "optimizer", None)
        metrics = getattr(self.model, "_compile_metrics", None)
        if (optimizer is None or getattr(optimizer, "built", True)) and (
            metrics is None or metrics.built
        ):
            self._variables = variables
        return variables

    def _pieces_now(self) -> list[_Piece]:
        """What one snapshot copies: a whole variable, or one shard of it."""
        if self._pieces is not None:
            return self._pieces
        variables = self.variables()
        if self.part is None:
            pieces = [
                _Piece(variable, self._read, _spec_of(name, variable))
                for name, variable in variables
            ]
        else:
            pieces = [
                piece
                for name, variable in variables
                for piece in _shard_pieces(name, variable, self.part[0])
            ]
        if self._variables is not None:
            self._pieces = pieces
        return pieces

    def layout(self) -> list[TensorSpec]:
        """The specs a snapshot will have, read without copying any value."""
        return [piece.spec for piece in self._pieces_now()]

    def _sync_backend_state(self) -> None:
        # The JAX trainer keeps the live state outside the Keras variables
        # during an epoch; writing it back is cheap (no copy of the arrays).
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()

    def take(
        self, into: HostSnapshot | None, epoch: int, batch: int
    ) -> HostSnapshot:
        """Copies the current state, reusing `into`'s buffers when they fit.

        Args:
            into: a snapshot whose buffers are free to overwrite, or `None`.
            epoch: epoch to record.
            batch: batch index to record.

        Returns:
            The filled snapshot: `into` itself when given, its buffers
            reused wherever shape and dtype still match.
        """
        snap, deferred = self.take_split(into, epoch, batch, defer=None)
        deferred.run()
        return snap

    def take_split(
        self,
        into: HostSnapshot | None,
        epoch: int,
        batch: int,
        defer: Callable[[Any], bool] | None,
    ) -> tuple[HostSnapshot, DeferredCopy]:
        """Copies the state but the variables `defer` picks, which it views.

        The deferred variables' buffers are allocated and their host views
        taken now; `DeferredCopy.run` copies them later. The snapshot is the
        state at this call only while nothing writes those variables until
        the copy is done (see `overlap`).

        Args:
            into: a snapshot whose buffers are free to overwrite, or `None`.
            epoch: epoch to record.
            batch: batch index to record.
            defer: picks the variables whose copy is deferred; `None`
                defers none.

        Returns:
            The snapshot, complete once the `DeferredCopy` has run, and that
            copy.
        """
        self._sync_backend_state()
        pieces = self._pieces_now()
        old = (
            {s.name: a for s, a in zip(into.specs, into.arrays)} if into else {}
        )
        old_regions = (
            {s.name: into._region(i) for i, s in enumerate(into.specs)}
            if into
            else {}
        )
        specs: list[TensorSpec] = []
        arrays: list[np.ndarray] = []
        regions: list[np.ndarray | None] = []
        crcs: list[int | None] = []
        deferred = DeferredCopy(crcs)
        for piece in pieces:
            name, variable = piece.spec.name, piece.variable
            buf = old.get(name)
            region = old_regions.get(name)
            view = piece.read(variable)
            if buf is None or buf.shape != view.shape or buf.dtype != view.dtype:
                # A new shape (rare: a rebuilt layer) gets a mapping of its
                # own, aligned like the others, so it stays zero-copy.
                (buf,), (region,) = aligned_arrays([(view.shape, view.dtype)])
            if defer is not None and defer(variable):
                deferred.add(len(crcs), buf, view)
                crcs.append(None)
            else:
                crcs.append(copy_checksummed(buf, view))
            # Drop the alias at once (see the module docstring).
            del view
            arrays.append(buf)
            regions.append(region)
            spec = piece.spec
            if buf.shape != spec.shape or buf.dtype != spec.dtype:
                # The host copy is what is written; the layout read from
                # the variable only predicted it (no new spec per save).
                spec = dataclasses.replace(spec, dtype=buf.dtype,
                                           shape=tuple(buf.shape))
            specs.append(spec)
        snap = into if into is not None else HostSnapshot(specs, arrays)
        snap.specs, snap.arrays, snap.regions = specs, arrays, regions
        snap.crcs = crcs
        snap.part = self.part
        snap.epoch, snap.batch = int(epoch), int(batch)
        snap.metadata = {}
        snap.taken_at = time.time()
        return snap, deferred


class DeferredCopy:
    """Copies of host views into snapshot buffers, to run later.

    Holding a TensorFlow view makes the variable's next in-place update copy
    its buffer first; `run` drops every view once copied, so the update that
    waits for it finds the buffer unshared.

    Args:
        crcs: the snapshot's `HostSnapshot.crcs`, where each copy records
            its checksum.
    """

    def __init__(self, crcs: list[int | None]) -> None:
        self._pairs: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._crcs = crcs
        self.nbytes = 0

    def add(self, index: int, buf: np.ndarray, view: np.ndarray) -> None:
        """Queues the copy of `view` into `buf`, the snapshot's array `index`."""
        self._pairs.append((index, buf, view))
        self.nbytes += buf.nbytes

    def __len__(self) -> int:
        return len(self._pairs)

    def run(self) -> None:
        """Copies every queued view, then drops the views (even on error)."""
        pairs, self._pairs = self._pairs, []
        try:
            while pairs:
                index, buf, view = pairs.pop()
                self._crcs[index] = copy_checksummed(buf, view)
                del buf, view
        finally:
            pairs.clear()
