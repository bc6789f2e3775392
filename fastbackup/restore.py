"""Restoring a model's state from the newest valid checkpoint.

Everything is verified before the model is touched: the file's checksums,
and that every saved tensor matches a model variable by name, shape and
dtype. A mismatch or damage never leaves a partially loaded model.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np

from fastbackup import storage
from fastbackup.errors import CheckpointCorruptError, CheckpointMismatchError
from fastbackup.format import CheckpointReader, TensorEntry
from fastbackup.snapshot import collect_variables, host_dtype

log = logging.getLogger("fastbackup")


def match_state(
    reader: CheckpointReader, model: keras.Model
) -> list[tuple[Any, TensorEntry]]:
    """Pairs every model variable with its tensor in `reader`.

    Args:
        reader: an opened checkpoint (header verified).
        model: the model the state is for; its optimizer must be built.

    Returns:
        `(variable, entry)` pairs covering every variable of the model.

    Raises:
        CheckpointMismatchError: naming the first variable that differs.
    """
    variables = collect_variables(model)
    entries = {e.name: e for e in reader.entries}
    expected = {name for name, _ in variables}
    compiled = getattr(model, "_compile_metrics", None)
    if compiled is not None and not compiled.built:
        # On TensorFlow a fresh model builds its compiled metrics only when
        # the first train step is traced, after `on_train_begin`. Keras
        # resets metrics at every epoch start, so their saved values carry
        # nothing a resumed epoch would use.
        skipped = [
            n for n in entries if n.startswith("metrics.") and n not in expected
        ]
        for name in skipped:
            del entries[name]
        if skipped:
            log.debug("compiled metrics not built yet: %d saved metric "
                      "variables not restored", len(skipped))
    for name, variable in variables:
        path = getattr(variable, "path", name)
        entry = entries.get(name)
        if entry is None:
            raise CheckpointMismatchError(
                f"Checkpoint {reader.path!r} does not match the model: "
                f"variable {name} ({path}) is not in the checkpoint, which "
                f"holds {len(entries)} variables for the model's "
                f"{len(variables)}."
            )
        want_dtype = host_dtype(variable).name
        want_shape = tuple(int(d) for d in variable.shape)
        if entry.shape != want_shape or entry.dtype != want_dtype:
            raise CheckpointMismatchError(
                f"Checkpoint {reader.path!r} does not match the model: "
                f"variable {name} ({path}) is {want_shape} {want_dtype} in "
                f"the model but {entry.shape} {entry.dtype} in the checkpoint "
                f"(saved as {entry.path})."
            )
    extra = [n for n in entries if n not in expected]
    if extra:
        e = entries[extra[0]]
        raise CheckpointMismatchError(
            f"Checkpoint {reader.path!r} does not match the model: it holds "
            f"variable {e.name} ({e.path}) that the model does not have "
            f"(checkpoint: {len(entries)} variables, model: {len(variables)})."
        )
    return [(variable, entries[name]) for name, variable in variables]


def read_state(
    reader: CheckpointReader, model: keras.Model
) -> list[tuple[Any, np.ndarray]]:
    """Reads and verifies every tensor of `reader` for `model`.

    Holds a private copy of the whole state; `restore_latest` assigns
    from a read-only mapping of the file instead.

    Args:
        reader: an opened checkpoint.
        model: the model the state is for; its optimizer must be built.

    Returns:
        `(variable, value)` pairs covering every variable of the model.

    Raises:
        CheckpointMismatchError: naming the first variable that differs.
        CheckpointCorruptError: a tensor fails its checksum.
    """
    values = []
    for variable, entry in match_state(reader, model):
        out = np.empty(entry.shape, dtype=entry.np_dtype)
        reader.read_tensor(entry, out)
        values.append((variable, out))
    return values


def _assign(plan: list[tuple[Any, TensorEntry]], values: list[np.ndarray]) -> None:
    # JAX may alias a host array instead of copying it; the mapped file is
    # closed after this, so JAX gets its own copy of every mapped (read-only)
    # view. Decoded tensors are private arrays already.
    copy = keras.backend.backend() == "jax"
    for (variable, _), value in zip(plan, values):
        variable.assign(np.array(value) if copy and not value.flags.writeable else value)


def restore_latest(
    directory: str | storage.Store, model: keras.Model, fall_back: bool
) -> CheckpointReader | None:
    """Restores the newest valid checkpoint of `directory` into `model`.

    Args:
        directory: the backup location: a `storage.Store`, or a path or URL
            for `storage.open_store`.
        model: a built model whose optimizer is built.
        fall_back: when the newest checkpoint is damaged, restore the
            previous one (`double_checkpoint=True`) instead of raising.

    Returns:
        The reader of the checkpoint restored (closed), or `None` when the
        directory holds no checkpoint.

    Raises:
        CheckpointCorruptError: the newest checkpoint is damaged and no
            fallback is allowed or available.
        CheckpointMismatchError: the checkpoint does not fit the model.
    """
    store = storage.open_store(directory)
    candidates = store.list_checkpoints()
    if not fall_back:
        candidates = candidates[:1]
    first_error: CheckpointCorruptError | None = None
    for _, path in candidates:
        try:
            with store.open_checkpoint(path) as reader:
                plan = match_state(reader, model)
                # Every checksum is verified before the model is touched.
                # The values are views of the mapped file: it is read once,
                # and no second copy of the state is allocated.
                values = [reader.verified_view(entry) for _, entry in plan]
                _assign(plan, values)
                del values
        except CheckpointCorruptError as e:
            log.warning("%s", e)
            first_error = first_error or e
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
