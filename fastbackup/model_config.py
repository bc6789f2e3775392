"""The model's architecture, stored beside its checkpoints for `export`.

A checkpoint holds variables, not the architecture they belong to, so
exporting one used to need the model (`--model`, `--model-factory`). The
callback therefore stores the model's Keras config once per `fit`, in a
small JSON file of the backup directory (`stores.names.MODEL_CONFIG_NAME`); every
checkpoint of that `fit` records the file's CRC-32C (`extra.model_config`),
which ties the two together and detects a damaged or foreign file.

Only a model that Keras can rebuild from its config alone is stored: a
`Sequential` or functional model of Keras layers, or a class registered with
`keras.saving.register_keras_serializable`. A subclassed model that is not
registered gets a file that says why it is not stored, so that `export` can
say it too.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from fastbackup._compat import native
from fastbackup.stores.names import MODEL_CONFIG_NAME

if TYPE_CHECKING:
    import keras

    from fastbackup.stores.base import Store

log = logging.getLogger("fastbackup")

_FORMAT = 1


class ModelConfigError(Exception):
    """The stored config is missing, damaged, or cannot rebuild a model."""


# Keras is imported by the functions that need it: `inspect` reads these
# files without paying seconds for Keras's import.


def _unstorable_reason(model: keras.Model) -> str | None:
    import keras

    cls = type(model)
    if cls.__module__.startswith("keras."):
        return None
    if keras.saving.get_registered_object(
        keras.saving.get_registered_name(cls)
    ) is cls:
        return None
    return (
        f"model class {cls.__module__}.{cls.__qualname__} is a subclassed "
        "model that is not registered with "
        "`keras.saving.register_keras_serializable`, so Keras cannot rebuild "
        "it from a config"
    )


def describe(model: keras.Model) -> tuple[bytes, str | None]:
    """Serialises `model`'s architecture (and compile config) once per fit.

    Args:
        model: a built Keras model.

    Returns:
        `(file contents, reason)`: `reason` says why the config is not
        stored (the model cannot be rebuilt from one), `None` when it is.
    """
    import keras

    reason = _unstorable_reason(model)
    config: Any = None
    if reason is None:
        try:
            config = keras.saving.serialize_keras_object(model)
            # Round-trip through JSON now: a value JSON cannot hold must
            # make the config absent, not the file unreadable.
            config = json.loads(json.dumps(config))
        except (TypeError, ValueError, NotImplementedError) as e:
            config = None
            reason = f"the model's config cannot be serialised: {e}"
    document = {
        "format": _FORMAT,
        "class_name": type(model).__name__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "config": config,
        "reason": reason,
    }
    return json.dumps(document).encode(), reason


def store(target: Store, model: keras.Model) -> int | None:
    """Writes `model`'s config into the backup, for `export`.

    Args:
        target: the backup's store, locked by this job.
        model: a built Keras model.

    Returns:
        The CRC-32C of the file, for the checkpoints to record; `None` when
        it could not be written.
    """
    data, not_stored = describe(model)
    if not_stored:
        log.info("fastbackup: the model's config is not stored, so "
                 "`export` will need --model or --model-factory: %s",
                 not_stored)
    try:
        target.write_object(MODEL_CONFIG_NAME, data)
    except OSError as e:
        # Only `export` needs it, and checkpoints that record no config
        # make `export` ask for the model: training goes on.
        log.warning("fastbackup: cannot write the model config (export "
                    "will need --model or --model-factory): %s", e)
        return None
    return checksum(data)


def checksum(data: bytes) -> int:
    """The CRC-32C that checkpoints record for the file `data`."""
    return native.crc32c(data)


def parse(data: bytes, expected_crc: int | None, path: str) -> dict[str, Any]:
    """Reads a stored config file, checked against a checkpoint's CRC.

    Args:
        data: the file's contents.
        expected_crc: `extra.model_config` of the checkpoint being exported,
            or `None` when it records none.
        path: the file, for messages.

    Returns:
        The parsed document (`config` is `None` when it was not stored).

    Raises:
        ModelConfigError: the checkpoint records no config, or another one.
    """
    if expected_crc is None:
        raise ModelConfigError(
            f"the checkpoint records no model config (written by a fastbackup "
            f"without it, or {path} was never written)"
        )
    if checksum(data) != expected_crc:
        raise ModelConfigError(
            f"{path} does not belong to this checkpoint (CRC-32C "
            f"{checksum(data):08x}, the checkpoint records "
            f"{expected_crc:08x}): damaged, or written by another fit"
        )
    try:
        document = json.loads(data)
    except ValueError as e:  # matched its CRC, so written by a bug of ours
        raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise ModelConfigError(f"{path}: unsupported model config format")
    return document


def rebuild(document: dict[str, Any], path: str) -> keras.Model:
    """Builds and compiles a fresh model from a parsed config document.

    Raises:
        ModelConfigError: no config was stored, or Keras cannot rebuild it.
    """
    import keras

    config = document.get("config")
    if config is None:
        raise ModelConfigError(
            f"the model's config was not stored: "
            f"{document.get('reason') or 'unknown reason'}"
        )
    try:
        # safe_mode refuses lambdas: a backup directory is data, not code.
        model = keras.saving.deserialize_keras_object(config, safe_mode=True)
    except Exception as e:  # Keras raises many types for an unknown class
        raise ModelConfigError(
            f"Keras cannot rebuild {document.get('class_name')!r} from "
            f"{path}: {e}"
        ) from e
    if not isinstance(model, keras.Model):
        raise ModelConfigError(
            f"{path} describes a {type(model).__name__}, not a keras.Model"
        )
    return model
