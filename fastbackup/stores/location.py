"""`open_store`: the one place that knows every kind of backup location.

It imports each implementation and nothing imports it back: the callback,
the writer, restore and the CLI call `open_store`, the stores never do.
"""

from __future__ import annotations

import os
import re

from fastbackup.stores.base import LocationStore
from fastbackup.stores.local import LocalStore
from fastbackup.stores.object_store import SCHEMES, ObjectStore

# `scheme:/...`: anything that looks like a URL is one, and is refused unless
# supported, so that "s3://b/p" can never become a local directory "s3:".
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


def is_url(location: str) -> bool:
    """True if `location` is a URL (`scheme:/...`), not a local path."""
    return _URL_RE.match(location) is not None


def open_store(
    location: str | os.PathLike[str] | LocationStore,
    *,
    lease_seconds: float | None = None,
    lease_wait_seconds: float | None = None,
    retry_seconds: float | None = None,
) -> LocationStore:
    """Returns the store of a backup location.

    Args:
        location: a local directory, a `file://` URL, an object-store URL
            (`s3://bucket/prefix`, `gs://bucket/prefix`), or a store
            (returned as is).
        lease_seconds: lifetime of an object store's lock lease. Defaults
            to `FASTBACKUP_LEASE_SECONDS` (60).
        lease_wait_seconds: how long an object store's `acquire_lock` waits
            for a lease it cannot check to lapse. Defaults to
            `FASTBACKUP_LEASE_WAIT_SECONDS` (120).
        retry_seconds: how long an object store's requests are retried.
            Defaults to `FASTBACKUP_RETRY_SECONDS` (180).

    Raises:
        ValueError: `location` is a URL of an unsupported scheme, or an
            object-store URL without a bucket.
    """
    if isinstance(location, LocationStore):
        return location
    path = os.fspath(location)
    m = _URL_RE.match(path)
    if m is None:
        return LocalStore(path)
    scheme = m.group(1).lower()
    if scheme == "file":
        if not path.lower().startswith("file:///"):
            raise ValueError(
                "A file URL must be absolute, as file:///path. "
                f"Received: backup_dir={path}"
            )
        return LocalStore(path[len("file://"):])
    if scheme in SCHEMES:
        return ObjectStore(
            path, lease_seconds=lease_seconds,
            lease_wait_seconds=lease_wait_seconds, retry_seconds=retry_seconds,
        )
    raise ValueError(
        f"Unsupported URL scheme {scheme!r} in `backup_dir`: supported are a "
        "local path, file:///path, "
        + ", ".join(f"{s}://" for s in SCHEMES)
        + f". Received: backup_dir={path}"
    )
