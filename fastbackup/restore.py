"""Restoring a model's state from the newest valid checkpoint.

Everything is verified before the model is touched: the file's checksums,
and that every saved tensor matches a model variable by name, shape and
dtype. A mismatch or damage never leaves a partially loaded model.

A checkpoint is a whole file, or (from a multi-process job, see `stores.parts`) a
manifest naming one part per process, each holding shards of the
variables. Either restores onto whatever layout the variables have now:
each variable's value is built for the pieces of it this process holds
(`addressable_devices_indices_map` of its JAX sharding; the whole array
elsewhere), from the saved shards that intersect them. A process therefore
reads only the saved shards it needs, and holds only its own pieces.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from fastbackup import backend
from fastbackup import format as fmt
from fastbackup.errors import CheckpointCorruptError, CheckpointMismatchError
from fastbackup.format import CheckpointReader, TensorEntry
from fastbackup.snapshot import collect_variables, host_dtype
from fastbackup.stores.base import LocationStore
from fastbackup.stores.location import open_store

log = logging.getLogger("fastbackup")

# A region of a variable: its start and its shape.
Region = tuple[tuple[int, ...], tuple[int, ...]]


class _Saved:
    """The saved pieces of one variable: whole, or shards from parts."""

    def __init__(self) -> None:
        self.pieces: list[tuple[CheckpointReader, TensorEntry]] = []
        self._views: dict[int, np.ndarray] = {}

    def view(self, index: int) -> np.ndarray:
        """Piece `index`'s value, checksum verified (once)."""
        if index not in self._views:
            reader, entry = self.pieces[index]
            self._views[index] = reader.verified_view(entry)
        return self._views[index]

    def drop_views(self) -> None:
        self._views.clear()

    def verify(self, want: Region) -> None:
        """Verifies the checksum of every piece that meets region `want`.

        A mapped piece's view is kept (it costs page cache only); a decoded
        (compressed) one is dropped, to be decoded again when assigned,
        so that verifying holds no state in process memory.
        """
        for i, (_, entry) in enumerate(self.pieces):
            if _intersect((entry.offsets, entry.shape), want) is not None:
                if self.view(i).flags.writeable:
                    del self._views[i]

    def region(self, want: Region, dtype: np.dtype) -> np.ndarray:
        """The saved values of region `want`, from the pieces it meets.

        A region that is exactly one piece is that piece's view (no copy).
        """
        start, shape = want
        for i, (_, entry) in enumerate(self.pieces):
            if entry.offsets == start and entry.shape == shape:
                return self.view(i)
        out = np.empty(shape, dtype=dtype)
        for i, (_, entry) in enumerate(self.pieces):
            overlap = _intersect((entry.offsets, entry.shape), want)
            if overlap is None:
                continue
            lo, hi = overlap
            src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, entry.offsets))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, start))
            out[dst] = self.view(i)[src]
        return out


def _intersect(a: Region, b: Region) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """`(low, high)` corners of the intersection of two regions, or None."""
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    hi = tuple(
        min(x + n, y + m) for x, n, y, m in zip(a[0], a[1], b[0], b[1])
    )
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, hi


def _volume(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _covers(entries: list[TensorEntry], shape: tuple[int, ...]) -> bool:
    """True if disjoint `entries` tile a variable of `shape` exactly."""
    if sum(_volume(e.shape) for e in entries) != _volume(shape):
        return False
    regions = [(e.offsets, e.shape) for e in entries]
    for i, a in enumerate(regions):
        for b in regions[i + 1:]:
            if _volume(a[1]) and _volume(b[1]) and _intersect(a, b) is not None:
                return False
    return True


def _model_variables(
    model: keras.Model, names: set[str], where: str
) -> list[tuple[str, Any]]:
    """The model's variables, without compiled metrics not yet built.

    The names of the saved variables left out are removed from `names`.
    """
    variables = collect_variables(model)
    compiled = getattr(model, "_compile_metrics", None)
    if compiled is not None and not compiled.built:
        # On TensorFlow a fresh model builds its compiled metrics only when
        # the first train step is traced, after `on_train_begin`. Keras
        # resets metrics at every epoch start, so their saved values matter
        # only to a mid-epoch resume, which gets them (`unbuilt_metrics` of
        # `restore_latest`) to assign once they are built.
        expected = {name for name, _ in variables}
        skipped = [n for n in names if n.startswith("metrics.") and n not in expected]
        for name in skipped:
            names.discard(name)
        if skipped:
            log.debug("compiled metrics not built yet: %d saved metric "
                      "variables of %s not restored", len(skipped), where)
    return variables


def _match(
    where: str, saved: dict[str, _Saved], model: keras.Model,
    unbuilt: dict[str, _Saved] | None = None,
) -> list[tuple[Any, _Saved]]:
    """Pairs every model variable with its saved pieces.

    `unbuilt`, when given, receives the saved pieces of the compiled metrics'
    variables the model has not built yet, by name.

    Raises:
        CheckpointMismatchError: naming the first variable that differs.
        CheckpointCorruptError: a variable's shards do not tile it.
    """
    names = set(saved)
    variables = _model_variables(model, names, where)
    if unbuilt is not None:
        unbuilt.update((n, s) for n, s in saved.items() if n not in names)
    expected = {name for name, _ in variables}
    for name, variable in variables:
        path = getattr(variable, "path", name)
        found = saved.get(name)
        if found is None:
            raise CheckpointMismatchError(
                f"Checkpoint {where!r} does not match the model: "
                f"variable {name} ({path}) is not in the checkpoint, which "
                f"holds {len(names)} variables for the model's "
                f"{len(variables)}."
            )
        entry = found.pieces[0][1]
        want_dtype = host_dtype(variable).name
        want_shape = tuple(int(d) for d in variable.shape)
        if entry.full_shape != want_shape or entry.dtype != want_dtype:
            raise CheckpointMismatchError(
                f"Checkpoint {where!r} does not match the model: "
                f"variable {name} ({path}) is {want_shape} {want_dtype} in "
                f"the model but {entry.full_shape} {entry.dtype} in the "
                f"checkpoint (saved as {entry.path})."
            )
        entries = [e for _, e in found.pieces]
        if any(
            e.full_shape != entry.full_shape or e.dtype != entry.dtype
            for e in entries
        ) or not _covers(entries, want_shape):
            raise CheckpointCorruptError(
                where, f"the saved shards of variable {name} ({path}) do not "
                "cover it exactly once"
            )
    extra = sorted(n for n in names if n not in expected)
    if extra:
        e = saved[extra[0]].pieces[0][1]
        raise CheckpointMismatchError(
            f"Checkpoint {where!r} does not match the model: it holds "
            f"variable {e.variable} ({e.path}) that the model does not have "
            f"(checkpoint: {len(names)} variables, model: {len(variables)})."
        )
    return [(variable, saved[name]) for name, variable in variables]


def match_state(
    reader: CheckpointReader, model: keras.Model
) -> list[tuple[Any, TensorEntry]]:
    """Pairs every model variable with its tensor in a whole checkpoint.

    Args:
        reader: an opened checkpoint (header verified), not a manifest.
        model: the model the state is for; its optimizer must be built.

    Returns:
        `(variable, entry)` pairs covering every variable of the model.

    Raises:
        CheckpointMismatchError: naming the first variable that differs.
    """
    plan = _match(reader.path, _whole(reader), model)
    return [(variable, found.pieces[0][1]) for variable, found in plan]


def _needed(
    plan: list[tuple[Any, _Saved]], whole: bool = False
) -> list[tuple[CheckpointReader, list[TensorEntry]]]:
    """The saved pieces this process reads, by reader: those that meet the
    regions of each variable it holds (every piece, with `whole`)."""
    needed: dict[int, tuple[CheckpointReader, list[TensorEntry]]] = {}
    for variable, saved in plan:
        local = None if whole else _wanted(variable)
        if local is None:
            shape = tuple(int(d) for d in variable.shape)
            regions: list[Region] = [((0,) * len(shape), shape)]
        else:
            regions = local[1]
        for reader, entry in saved.pieces:
            if any(_intersect((entry.offsets, entry.shape), r) is not None
                   or not _volume(entry.shape) for r in regions):
                needed.setdefault(id(reader), (reader, []))[1].append(entry)
    return list(needed.values())


def _fetch(plan: list[tuple[Any, _Saved]]) -> None:
    """Reads ahead, all at once, the saved pieces this process will verify
    and assign: from a bucket, only their byte ranges, every part's side by
    side (a local file is mapped: nothing to do)."""
    fmt.fetch(_needed(plan))


def _whole(reader: CheckpointReader) -> dict[str, _Saved]:
    saved: dict[str, _Saved] = {}
    for entry in reader.entries:
        saved.setdefault(entry.variable, _Saved()).pieces.append((reader, entry))
    return saved


class ManifestParts:
    """The parts a manifest names, opened and checked against it.

    Args:
        store: the store holding the parts.
        manifest: the opened manifest of a multi-process checkpoint.

    Raises:
        CheckpointCorruptError: a part is missing, damaged, or not the one
            the manifest committed (another step, position or size).
    """

    def __init__(self, store: LocationStore, manifest: CheckpointReader) -> None:
        self.readers: list[CheckpointReader] = []
        try:
            count = len(manifest.parts)
            for index, part in enumerate(manifest.parts):
                reader = store.open_part(part["name"])
                self.readers.append(reader)
                where = f"{manifest.path}: part {part['name']}"
                if (
                    not reader.is_part
                    or reader.part != (index, count)
                    or reader.step != manifest.step
                    or (reader.epoch, reader.batch)
                    != (manifest.epoch, manifest.batch)
                    or reader.file_size != part["size"]
                ):
                    raise CheckpointCorruptError(
                        where, "it is not the part the manifest names (other "
                        "step, position or size)"
                    )
        except FileNotFoundError as e:
            self.close()
            raise CheckpointCorruptError(
                manifest.path, f"a part it names is missing: {e}"
            ) from None
        except BaseException:
            self.close()
            raise

    def saved(self) -> dict[str, _Saved]:
        saved: dict[str, _Saved] = {}
        for reader in self.readers:
            for entry in reader.entries:
                saved.setdefault(entry.variable, _Saved()).pieces.append(
                    (reader, entry)
                )
        return saved

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.readers = []


def _wanted(variable: Any) -> tuple[Any, list[Region]] | None:
    """The sharding and the regions this process holds of `variable`.

    `None` where the variable takes a whole host array (every backend but
    JAX in a multi-process job: there Keras places the array itself).
    """
    local = backend.current().local_shards(variable)
    if local is None:
        return None
    sharding, indices = local
    shape = tuple(int(d) for d in variable.shape)
    regions: list[Region] = []
    for index in indices:
        region = backend.region_of(index, shape)
        if region not in regions:
            regions.append(region)
    return sharding, regions


class _Prepared:
    """Every value to assign, verified; assigned only by `assign`.

    Verifying reads the saved shards through views of the files (mapped:
    page cache, not process memory). A variable held in pieces gets its
    pieces built only when it is assigned, one variable at a time, so that
    host memory stays at one variable's pieces beyond the model itself.
    """

    def __init__(self, plan: list[tuple[Any, _Saved]]) -> None:
        self.values: list[tuple[Any, Any, Any]] = []
        for variable, saved in plan:
            dtype = host_dtype(variable)
            wanted = _wanted(variable)
            if wanted is None:
                shape = tuple(int(d) for d in variable.shape)
                whole = ((0,) * len(shape), shape)
                self.values.append(
                    (variable, None, saved.region(whole, dtype))
                )
            else:
                sharding, regions = wanted
                for region in regions:
                    saved.verify(region)
                self.values.append((variable, sharding, (saved, regions, dtype)))

    def assign(self) -> None:
        # JAX may alias a host array instead of copying it; the mapped file
        # is closed after this, so JAX gets its own copy of every mapped
        # (read-only) view. Decoded tensors are private arrays already.
        framework = backend.current()
        while self.values:
            variable, sharding, value = self.values.pop(0)
            if sharding is None:
                if framework.copies_mapped_views and not value.flags.writeable:
                    value = np.array(value)
                variable.assign(value)
                continue
            saved, regions, dtype = value
            pieces = {r: np.array(saved.region(r, dtype)) for r in regions}
            shape = tuple(int(d) for d in variable.shape)
            framework.assign_shards(
                variable, sharding,
                lambda index: pieces[backend.region_of(index, shape)],
            )
            del pieces
            saved.drop_views()


def _prepare(
    store: LocationStore, reader: CheckpointReader, model: keras.Model,
    unbuilt: dict[str, _Saved] | None = None,
) -> tuple[_Prepared, ManifestParts | None]:
    """Matches and verifies a checkpoint; nothing is assigned yet."""
    if not reader.is_manifest:
        plan = _match(reader.path, _whole(reader), model, unbuilt)
        _fetch(plan)
        return _Prepared(plan), None
    parts = ManifestParts(store, reader)
    try:
        plan = _match(reader.path, parts.saved(), model, unbuilt)
        _fetch(plan)
        return _Prepared(plan), parts
    except BaseException:
        parts.close()
        raise


def read_state(
    reader: CheckpointReader, model: keras.Model,
    store: LocationStore | None = None,
) -> list[tuple[Any, np.ndarray]]:
    """Reads and verifies every variable of a checkpoint for `model`.

    Holds a private copy of the whole state; `restore_latest` assigns
    from a read-only mapping of the file instead.

    Args:
        reader: an opened checkpoint.
        model: the model the state is for; its optimizer must be built.
        store: the store the checkpoint is in, which holds the parts a
            manifest names. Needed for a multi-process checkpoint only.

    Returns:
        `(variable, value)` pairs covering every variable of the model,
        each value the whole array.

    Raises:
        CheckpointMismatchError: naming the first variable that differs.
        CheckpointCorruptError: a tensor fails its checksum.
    """
    parts = None
    if reader.is_manifest:
        if store is None:
            raise ValueError(
                f"{reader.path} is the manifest of a multi-process "
                "checkpoint: reading it needs the store of its parts"
            )
        parts = ManifestParts(store, reader)
        saved = parts.saved()
    else:
        saved = _whole(reader)
    try:
        values = []
        plan = _match(reader.path, saved, model)
        fmt.fetch(_needed(plan, whole=True))
        for variable, found in plan:
            shape = tuple(int(d) for d in variable.shape)
            value = found.region(((0,) * len(shape), shape), host_dtype(variable))
            values.append((variable, np.array(value)))
            found.drop_views()
        return values
    finally:
        if parts is not None:
            parts.close()


def _whole_values(saved: dict[str, _Saved]) -> dict[str, np.ndarray]:
    """Each variable's whole saved value, verified, as a private copy."""
    values = {}
    for name, found in saved.items():
        entry = found.pieces[0][1]
        shape = entry.full_shape
        values[name] = np.array(found.region(
            ((0,) * len(shape), shape), fmt.dtype_from_name(entry.dtype)))
        found.drop_views()
    return values


def make_ready(model: keras.Model, restoring: bool = True) -> None:
    """Builds what a restore loads into: the optimizer's variables.

    Args:
        model: the model.
        restoring: a checkpoint is about to be loaded, so the optimizer is
            built, as Keras's callback builds it before `load_weights`.
            Otherwise (a `fit` that may have nothing to restore) it is
            built only for a model whose every layer is built: a subclassed
            model "built" with `model.build(shape)` may keep sublayers
            unbuilt until its first train step (TensorFlow), and an
            optimizer built now would hold slots for only part of its
            trainable variables, then fail that step ("Unknown variable").
            Left unbuilt, it is built by that step, as without any
            callback. Defaults to True.

    Raises:
        ValueError: the model is not built (Keras's callback's message).
    """
    if not model.built:
        raise ValueError(
            "To use the BackupAndRestore callback, "
            "you model must be built before you call `fit()`. "
            f"Model {model} is unbuilt. You can build it "
            "beforehand by calling it on a batch of data."
        )
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built and (
        restoring or all(layer.built for layer in model._flatten_layers())
    ):
        # Make sure optimizer variables exist before loading.
        optimizer.build(model.trainable_variables)


def restore_latest(
    location: str | os.PathLike[str] | LocationStore,
    model: keras.Model,
    fall_back: bool,
    agree: Callable[[bool], bool] | None = None,
    unbuilt_metrics: dict[str, np.ndarray] | None = None,
) -> CheckpointReader | None:
    """Restores the newest valid checkpoint of `location` into `model`.

    Args:
        location: the backup location: its store, or a path or URL for
            `stores.location.open_store`.
        model: a built model whose optimizer is built.
        fall_back: when the newest checkpoint is damaged, restore the
            previous one (`double_checkpoint=True`) instead of raising.
        agree: in a multi-process job, tells every process whether this one
            verified the candidate and returns whether all did, so that
            every process restores the same checkpoint. Defaults to `None`
            (one process).
        unbuilt_metrics: when given, receives the saved values (verified,
            private copies) of the compiled metrics' variables that the
            model has not built yet, by name ("metrics.<index>"), for the
            caller to assign once they are built. Defaults to `None`.

    Returns:
        The reader of the checkpoint restored (closed), or `None` when the
        location holds no checkpoint.

    Raises:
        CheckpointCorruptError: the newest checkpoint is damaged and no
            fallback is allowed or available.
        CheckpointMismatchError: the checkpoint does not fit the model.
    """
    store = open_store(location)
    candidates = store.list_checkpoints()
    if not fall_back:
        candidates = candidates[:1]
    first_error: CheckpointCorruptError | None = None
    for _, path in candidates:
        error: CheckpointCorruptError | None = None
        reader = prepared = parts = None
        pending: dict[str, np.ndarray] = {}
        try:
            try:
                reader = store.open_checkpoint(path)
                # Every checksum is verified before the model is touched.
                # Whole values are views of the mapped file: it is read
                # once, and no second copy of the state is allocated.
                unbuilt: dict[str, _Saved] | None = (
                    None if unbuilt_metrics is None else {}
                )
                prepared, parts = _prepare(store, reader, model, unbuilt)
                pending = _whole_values(unbuilt or {})
            except CheckpointCorruptError as e:
                log.warning("%s", e)
                error = e
            everyone = agree(error is None) if agree is not None else error is None
            if everyone:
                prepared.assign()  # type: ignore[union-attr]
                if unbuilt_metrics is not None:
                    unbuilt_metrics.update(pending)
            elif error is None:
                error = CheckpointCorruptError(
                    path, "another process of the job could not verify it"
                )
                log.warning("%s", error)
        finally:
            prepared = None
            if parts is not None:
                parts.close()
            if reader is not None:
                reader.close()
        if error is not None:
            first_error = first_error or error
            continue
        if first_error is not None:
            log.warning(
                "restored the previous checkpoint %s (step %d, epoch %d) "
                "because the newest one is damaged", path, reader.step,
                reader.epoch,
            )
        return reader
    if first_error is not None:
        raise first_error
    return None
