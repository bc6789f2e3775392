"""The names of what a backup location holds, whatever the store.

A backup holds checkpoints named `ckpt-<step>.fbk`, where `step` is a
sequence number that only grows; in a multi-process job, one part per
process beside each checkpoint (`part_name`), committed by the checkpoint
itself, a manifest; and small named objects (`Store.write_object`: the
model's config, `MODEL_CONFIG_NAME`). A local directory adds its lock file
and temporary files, an object store its commit record and lease.
"""

from __future__ import annotations

import re

CHECKPOINT_RE = re.compile(r"^ckpt-([0-9]{12})\.fbk$")
# One process's part of a multi-process checkpoint (`stores.parts`).
PART_RE = re.compile(r"^ckpt-([0-9]{12})\.part-([0-9]{5})-of-([0-9]{5})\.fbk$")
# The model's config, stored once per fit for `export` (`model_config`).
MODEL_CONFIG_NAME = "model-config.json"
# Names of the small objects of `Store.write_object`: a plain file name, so
# that it cannot escape the backup location nor look like a checkpoint.
_OBJECT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Small objects are a few KiB (a model's config); a larger one is not ours.
MAX_OBJECT_BYTES = 64 << 20


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint with sequence number `step`."""
    return f"ckpt-{step:012d}.fbk"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint's file name, or `None` if not one."""
    m = CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def part_name(step: int, index: int, count: int) -> str:
    """File name of process `index`'s part of checkpoint `step`."""
    return f"ckpt-{step:012d}.part-{index:05d}-of-{count:05d}.fbk"


def part_step(name: str) -> int | None:
    """The step of a part's file name, or `None` if not a part's name."""
    m = PART_RE.match(name)
    return int(m.group(1)) if m else None


def check_part_name(name: str) -> str:
    """Validates a part's file name (see `part_name`).

    Raises:
        ValueError: `name` is not a part's name.
    """
    if not PART_RE.match(name):
        raise ValueError(
            "Invalid part name: expected ckpt-<12 digits>.part-<5 digits>-of-"
            f"<5 digits>.fbk. Received: name={name!r}"
        )
    return name


def check_object_name(name: str) -> str:
    """Validates the name of a `Store.write_object` object.

    Raises:
        ValueError: `name` is not a plain name, or is a checkpoint's.
    """
    if (
        not isinstance(name, str)
        or not _OBJECT_NAME_RE.match(name)
        or CHECKPOINT_RE.match(name)
    ):
        raise ValueError(
            "Invalid object name: expected letters, digits, '_', '.' or '-' "
            "(not starting with '.', '_' or '-', at most 128 characters, not "
            f"a checkpoint's name). Received: name={name!r}"
        )
    return name
