"""Backups in an object store (`s3://bucket/prefix`, `gs://bucket/prefix`).

Object stores have no rename, so a checkpoint is committed the way every
serious checkpointer does it: the data object first (one multipart upload,
streamed from the snapshot's buffers, parts sent in parallel), then a small
commit record, written last with one PUT, which lists the committed
checkpoints. A PUT is visible whole or not at all, so readers that trust only
the record never see a partial checkpoint; finding the newest costs one GET.
Data objects the record does not name (a writer killed mid-upload) are
removed under the lock at the next `fit`.

The lock is a lease object created with a conditional PUT (`If-None-Match: *`
on S3, `ifGenerationMatch=0` on GCS): a second job's create fails. The holder
renews the lease from a background thread; a killed job stops renewing. The
next job takes its lease over at once when the lease names a process of its
own host that is gone, and otherwise once the lease lapses without a
renewal, in both cases with a conditional update on the lease's
ETag/generation, so two jobs racing for one lease cannot both win
(`stores.lease`).

The client is `obstore` (Rust `object_store`): chosen by measurement, see
`docs/remote-storage.md`. It releases the GIL, uploads parts concurrently and
retries 5xx, 503 SlowDown and dropped connections with exponential backoff.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import errno
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import obstore
from obstore import exceptions as obx

from fastbackup import config as config_lib
from fastbackup._compat import native
from fastbackup.format import (
    TAIL_BYTES,
    CheckpointReader,
    EncodedCheckpoint,
    RangedCheckpointReader,
)
from fastbackup.stores import locks
from fastbackup.stores.base import (
    CommitResult,
    LocationStore,
    WriteCancelled,
    io_error,
)
from fastbackup.stores.lease import Lease
from fastbackup.stores.names import (
    CHECKPOINT_RE,
    PART_RE,
    check_object_name,
    check_part_name,
    checkpoint_name,
)

log = logging.getLogger("fastbackup")

SCHEMES = ("s3", "s3a", "gs")
COMMIT_RECORD = "COMMITTED"
LEASE_NAME = "LEASE"
# Names reserved by the store itself: `write_object` refuses them.
_RESERVED = (COMMIT_RECORD, LEASE_NAME)

# Part size of the multipart upload and of the ranged reads. S3 wants parts
# of 5 MiB to 5 GiB; 16 MiB keeps a 10,000-part upload good for 160 GB and
# the client's buffering (concurrency x part) at 128 MiB.
PART_BYTES = 16 << 20
CONCURRENCY = 8
DEFAULT_LEASE_SECONDS = 60.0


def _retry_config(seconds: float) -> dict[str, Any]:
    # By default 3 minutes of retries with backoff from 0.1 s to 15 s:
    # longer than a typical S3 503 SlowDown episode, short enough that a
    # dead endpoint becomes a BackupWriteError instead of a silent stall.
    return {
        "max_retries": 20,
        "backoff": {
            "init_backoff": datetime.timedelta(milliseconds=100),
            "max_backoff": datetime.timedelta(seconds=15),
            "base": 2.0,
        },
        "retry_timeout": datetime.timedelta(seconds=seconds),
    }


def _client_options(
    endpoint: str | None, request_timeout_seconds: float
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "connect_timeout": "10s",
        # Per request, from connecting to the end of the answer: a server
        # that stops answering costs one timeout per try, then the request
        # is retried within retry_seconds. The default (120 s) fits a
        # 16 MiB part at 1 MB/s.
        "timeout": datetime.timedelta(seconds=request_timeout_seconds),
    }
    if endpoint and endpoint.startswith("http://"):
        # An explicit plain-HTTP endpoint (an emulator, a local MinIO) is
        # what the user asked for; obstore refuses it unless told.
        options["allow_http"] = True
    return options


def _make_client(
    scheme: str, bucket: str, retry_seconds: float,
    request_timeout_seconds: float = config_lib.Config.request_timeout_seconds,
) -> Any:
    """Creates the obstore client of a bucket from the standard variables.

    Args:
        scheme: "s3", "s3a" or "gs".
        bucket: the bucket's name.
        retry_seconds: how long a failing request is retried.
        request_timeout_seconds: the longest one request may take, from
            connecting to the end of the answer, before it is abandoned
            (and retried).

    Returns:
        An obstore `S3Store` or `GCSStore`.
    """
    from obstore.store import GCSStore, S3Store

    if scheme in ("s3", "s3a"):
        endpoint = (
            os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        kwargs: dict[str, Any] = {}
        if endpoint:
            kwargs["endpoint"] = endpoint
            # Custom endpoints (MinIO, Ceph, moto) are path-style.
            kwargs["virtual_hosted_style_request"] = False
        region = os.environ.get("AWS_REGION") or os.environ.get(
            "AWS_DEFAULT_REGION"
        )
        if region:
            kwargs["region"] = region
        return S3Store(
            bucket,
            client_options=_client_options(endpoint, request_timeout_seconds),
            retry_config=_retry_config(retry_seconds),
            **kwargs,
        )
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        # The variable the Google client libraries honour: an emulator
        # without authentication.
        base = emulator if "://" in emulator else f"http://{emulator}"
        key = json.dumps({
            "gcs_base_url": base.rstrip("/"), "disable_oauth": True,
            "client_email": "", "private_key": "", "private_key_id": "",
        })
        return GCSStore(
            bucket,
            config={"service_account_key": key},
            client_options=_client_options(base, request_timeout_seconds),
            retry_config=_retry_config(retry_seconds),
        )
    # GOOGLE_APPLICATION_CREDENTIALS, or the VM's metadata server.
    return GCSStore(
        bucket,
        client_options=_client_options(None, request_timeout_seconds),
        retry_config=_retry_config(retry_seconds),
    )


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")


def parse_url(url: str) -> tuple[str, str, str]:
    """Splits `scheme://bucket/prefix` into its parts.

    Raises:
        ValueError: unsupported scheme, invalid bucket, or no prefix.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            f"Unsupported object store URL: expected "
            f"{', '.join(s + '://bucket/prefix' for s in SCHEMES)}. "
            f"Received: backup_dir={url}"
        )
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(
            f"Invalid bucket name {bucket!r} in `backup_dir`. "
            f"Received: backup_dir={url}"
        )
    if not prefix or any(p in ("", ".", "..") for p in prefix.split("/")):
        # The prefix is emptied after a successful fit: a bucket's root
        # would be emptied whole.
        raise ValueError(
            "An object store `backup_dir` needs a prefix of its own inside "
            "the bucket (it is emptied at the end of a successful fit), e.g. "
            f"{scheme}://{bucket}/runs/job-1. Received: backup_dir={url}"
        )
    return scheme, bucket, prefix


def record_bytes(entries: list[dict[str, Any]]) -> bytes:
    """The commit record naming `entries` (`step`, `name`, `size`), newest
    first."""
    return json.dumps({"format": 1, "checkpoints": entries}).encode()


def _dropped_connection(e: BaseException) -> bool:
    """Whether a client error is a connection lost while a request was
    sent (the client's own words: obstore 0.12 has no class for it), not
    an answer from the server."""
    return isinstance(e, obx.GenericError) and "error sending request" in str(e)


# The reading threads of every object read by this process: at most
# CONCURRENCY requests in flight, whatever the number of objects read at
# once (the parts of a multi-process checkpoint are read side by side).
_read_pool: concurrent.futures.ThreadPoolExecutor | None = None
_read_pool_lock = threading.Lock()


def _reading_threads() -> concurrent.futures.ThreadPoolExecutor:
    global _read_pool
    with _read_pool_lock:
        if _read_pool is None:
            _read_pool = concurrent.futures.ThreadPoolExecutor(
                CONCURRENCY, thread_name_prefix="fastbackup-read"
            )
        return _read_pool


def _forget_reading_threads() -> None:
    # A forked child has none of its parent's threads.
    global _read_pool, _read_pool_lock
    _read_pool, _read_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_reading_threads)


class _ObjectRanges:
    """One object of a bucket read by ranges (a `format.RangeSource`).

    Requests of PART_BYTES keep one connection busy, as the multipart
    upload's parts do; the bytes stay in the buffers the client returns.
    """

    def __init__(self, client: Any, key: str, url: str, size: int,
                 tail: tuple[int, Any] | None = None) -> None:
        self.client, self.key, self.url, self.size = client, key, url, size
        # (start, bytes) of the object's end, already read.
        self._tail = tail

    @property
    def chunk_bytes(self) -> int:
        return PART_BYTES

    def submit(
        self, start: int, length: int, arrived: Callable[[Any], Any]
    ) -> concurrent.futures.Future[Any]:
        if self._tail is not None:
            at, data = self._tail
            if at <= start and start + length <= at + len(data):
                done: concurrent.futures.Future[Any] = concurrent.futures.Future()
                try:
                    done.set_result(arrived(
                        memoryview(data)[start - at:start - at + length]))
                except BaseException as e:  # the caller's, as from a thread
                    done.set_exception(e)
                return done
        return _reading_threads().submit(self._get, start, length, arrived)

    def _get(self, start: int, length: int,
             arrived: Callable[[Any], Any]) -> Any:
        try:
            data = obstore.get_range(self.client, self.key, start=start,
                                     length=length)
        except FileNotFoundError:
            raise  # pruned by a running training
        except obx.BaseError as e:
            raise io_error("reading", self.url, e) from None
        return arrived(data)


class ObjectStore(LocationStore):
    """A backup under a prefix of an S3 or GCS bucket.

    Args:
        url: `s3://bucket/prefix` or `gs://bucket/prefix`.
        lease_seconds: lifetime of the lock lease; a killed job's backup can
            be taken over this long after its last renewal. Defaults to
            `FASTBACKUP_LEASE_SECONDS`, or 60.
        lease_wait_seconds: the longest `acquire_lock` waits for a lease
            whose holder it cannot check (another host) to lapse. Defaults
            to `FASTBACKUP_LEASE_WAIT_SECONDS`, or 120.
        retry_seconds: how long a failing request is retried, with
            backoff, before it fails. Defaults to `FASTBACKUP_RETRY_SECONDS`,
            or 180.
        request_timeout_seconds: the longest one request may take, from
            connecting to the end of the answer, before it is abandoned and
            retried, within `retry_seconds`. Defaults to `FASTBACKUP_REQUEST_TIMEOUT_SECONDS`,
            or 120.
        client: an obstore store for the bucket, instead of one made from
            the environment (tests, custom credentials).

    Raises:
        ValueError: the URL is not supported, or a duration is not
            positive.
    """

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float | None = None,
        lease_wait_seconds: float | None = None,
        retry_seconds: float | None = None,
        request_timeout_seconds: float | None = None,
        client: Any = None,
    ) -> None:
        self.scheme, self.bucket, self.prefix = parse_url(url)
        self.location = f"{self.scheme}://{self.bucket}/{self.prefix}"
        if lease_seconds is None:
            lease_seconds = config_lib.seconds_from_environ(
                "FASTBACKUP_LEASE_SECONDS")
        if lease_wait_seconds is None:
            lease_wait_seconds = config_lib.seconds_from_environ(
                "FASTBACKUP_LEASE_WAIT_SECONDS")
        if retry_seconds is None:
            retry_seconds = config_lib.seconds_from_environ(
                "FASTBACKUP_RETRY_SECONDS")
        if request_timeout_seconds is None:
            request_timeout_seconds = config_lib.seconds_from_environ(
                "FASTBACKUP_REQUEST_TIMEOUT_SECONDS")
        for arg, value in (("lease_seconds", lease_seconds),
                           ("lease_wait_seconds", lease_wait_seconds),
                           ("retry_seconds", retry_seconds),
                           ("request_timeout_seconds",
                            request_timeout_seconds)):
            if not value > 0:
                raise ValueError(
                    f"Invalid value for argument `{arg}`: expected a "
                    f"positive number. Received: {arg}={value}"
                )
        self.lease_seconds = float(lease_seconds)
        self.lease_wait_seconds = float(lease_wait_seconds)
        self.retry_seconds = float(retry_seconds)
        self.request_timeout_seconds = float(request_timeout_seconds)
        self.client = client if client is not None else _make_client(
            self.scheme, self.bucket, self.retry_seconds,
            self.request_timeout_seconds,
        )
        # The commit record as this process last read or wrote it. While
        # this process holds the lease nobody else writes it, so commits
        # need not read it again.
        self._record: list[dict[str, Any]] | None = None
        # How many checkpoints `prune` keeps (learnt at its first call), and
        # the objects a commit dropped from the record for `prune` to delete.
        self._keep: int | None = None
        self._dropped: list[str] = []

    def __repr__(self) -> str:
        return f"ObjectStore({self.location!r})"

    # Names --------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def url_of(self, name: str) -> str:
        """The URL of the object `name` of this backup."""
        return f"{self.location}/{name}"

    def _name_of_url(self, url: str) -> str:
        head = self.location + "/"
        name = url[len(head):] if url.startswith(head) else ""
        if not CHECKPOINT_RE.match(name):
            raise ValueError(
                f"Not a checkpoint of {self.location}. Received: location={url}"
            )
        return name

    # Commit record -------------------------------------------------------

    def _read_record(self) -> list[dict[str, Any]]:
        """The committed checkpoints, newest first, from the commit record."""
        data = self._get_small(COMMIT_RECORD)
        if data is None:
            return []
        try:
            record = json.loads(data)
            entries = [
                {"step": int(e["step"]), "name": str(e["name"]),
                 "size": int(e["size"])}
                for e in record["checkpoints"]
            ]
        except (ValueError, KeyError, TypeError) as e:
            raise OSError(
                errno.EBADMSG,
                f"the commit record is damaged ({e}); remove it to start "
                "over",
                self.url_of(COMMIT_RECORD),
            ) from None
        for e in entries:
            if not CHECKPOINT_RE.match(e["name"]):
                raise OSError(errno.EBADMSG, "the commit record names an "
                              f"invalid object {e['name']!r}",
                              self.url_of(COMMIT_RECORD))
        entries.sort(key=lambda e: e["step"], reverse=True)
        self._record = entries
        return list(entries)

    def _committed(self) -> list[dict[str, Any]]:
        """The commit record, read again unless this process holds the lease."""
        if self._record is not None and self._held_lease() is not None:
            return list(self._record)
        return self._read_record()

    def _write_record(self, entries: list[dict[str, Any]]) -> None:
        body = record_bytes(entries)
        self._record = None  # unknown if the PUT fails half way
        self._put_small(COMMIT_RECORD, body)
        self._record = list(entries)

    def _get_small(self, name: str) -> bytes | None:
        try:
            return bytes(obstore.get(self.client, self._key(name)).bytes())
        except FileNotFoundError:
            return None
        except obx.BaseError as e:
            raise io_error(f"reading {name}", self.url_of(name), e) from None

    def _put_small(self, name: str, data: bytes) -> None:
        try:
            obstore.put(self.client, self._key(name), data)
        except obx.BaseError as e:
            raise io_error(f"writing {name}", self.url_of(name), e) from None

    # Store interface ------------------------------------------------------

    def list_checkpoints(self) -> list[tuple[int, str]]:
        return [(e["step"], self.url_of(e["name"])) for e in self._read_record()]

    def commit(self, step: int, encoded: EncodedCheckpoint, sync: bool,
               cancel: threading.Event | None = None,
               direct: bool = False) -> CommitResult:
        """Uploads one checkpoint, then commits it in the commit record.

        The segments are uploaded as they are (no staging copy of the
        state): one PUT when the checkpoint is smaller than a part,
        otherwise a multipart upload whose parts go out concurrently. The
        CRC-32C of each segment is computed as it is handed to the client,
        so the bytes are those `LocalStore.commit` writes to a file. Object
        PUTs are durable when acknowledged; `sync` and `direct` concern
        local disks only.

        Raises:
            OSError: the upload or the commit failed after the client's
                retries; earlier checkpoints stay committed. A failed
                multipart upload is aborted.
            WriteCancelled: `cancel` was set before the commit record.
            BackupDirLockedError: this job's lease was lost.
        """
        held = self._held_lease()
        name = checkpoint_name(step)
        start = time.perf_counter()
        size = self._upload(name, encoded, cancel)
        if held is not None:
            held.check()
        # The commit point: the record now names the new checkpoint (and,
        # once `prune` has said how many to keep, only those: the objects it
        # no longer names are deleted by the `prune` that follows).
        entries = [e for e in self._committed() if e["step"] != step]
        entries.insert(0, {"step": int(step), "name": name, "size": size})
        if self._keep is not None:
            self._dropped += [e["name"] for e in entries[self._keep:]]
            entries = entries[:self._keep]
        self._write_record(entries)
        return CommitResult(self.url_of(name), step, size,
                            time.perf_counter() - start)

    def _upload(
        self, name: str, encoded: EncodedCheckpoint,
        cancel: threading.Event | None,
    ) -> int:
        """Uploads one checkpoint file as object `name`; returns its size.

        The client retries what it knows to be idempotent. A request it
        will not resend (on GCS the POSTs that start and complete a
        multipart upload) fails the upload when its connection drops: the
        whole upload is then sent again, from the same buffers, until
        `retry_seconds` after the first try. A data object is not visible
        to readers before the commit record names it, so a second upload
        of it is harmless.
        """
        url = self.url_of(name)
        deadline = time.monotonic() + self.retry_seconds
        backoff = 0.1
        while True:
            try:
                size = self._upload_once(name, encoded, cancel)
                break
            except WriteCancelled:
                raise
            except obx.BaseError as e:
                if not _dropped_connection(e) or time.monotonic() + backoff > deadline:
                    raise io_error(f"uploading {name}", url, e) from None
                log.warning("fastbackup: uploading %s failed on a dropped "
                            "connection, sending it again: %s", url,
                            str(e).splitlines()[0])
                time.sleep(backoff)
                backoff = min(backoff * 2, 15.0)
        if cancel is not None and cancel.is_set():
            self._delete([name])
            raise WriteCancelled(name)
        return size

    def _upload_once(
        self, name: str, encoded: EncodedCheckpoint,
        cancel: threading.Event | None,
    ) -> int:
        crcs: list[int] = []
        sizes = [0]

        def stream() -> Iterator[Any]:
            for segment, known in zip(encoded.segments, encoded.known_crcs):
                if cancel is not None and cancel.is_set():
                    raise WriteCancelled(name)
                crcs.append(
                    native.crc32c(segment) if known is None else known
                )
                sizes[0] += len(segment)
                if len(segment):
                    yield segment
            trailer = encoded.trailer(crcs)
            sizes[0] += len(trailer)
            yield trailer

        if encoded.payload_end <= PART_BYTES:
            # Small: one PUT of a joined copy (at most one part) costs one
            # request where a multipart upload costs three.
            obstore.put(self.client, self._key(name), b"".join(stream()))
        else:
            obstore.put(
                self.client, self._key(name), stream(),
                chunk_size=PART_BYTES, max_concurrency=CONCURRENCY,
            )
        return sizes[0]

    def prune(self, keep: int) -> None:
        self._keep = keep
        entries = self._committed()
        dropped, self._dropped = self._dropped, []
        if len(entries) > keep:
            # The record forgets them first: it never names a deleted object.
            self._write_record(entries[:keep])
            dropped += [e["name"] for e in entries[keep:]]
        self._delete(dropped)

    def _list_names(self) -> list[str]:
        """Names of every object under the prefix (ours only: bounded)."""
        names = []
        head = self.prefix + "/"
        try:
            for chunk in obstore.list(self.client, self.prefix):
                for meta in chunk:
                    path = meta["path"]
                    if path.startswith(head):
                        names.append(path[len(head):])
        except obx.BaseError as e:
            raise io_error("listing", self.location, e) from None
        return names

    def _delete(self, names: list[str]) -> None:
        if not names:
            return
        keys = [self._key(n) for n in names]
        try:
            obstore.delete(self.client, keys)
        except FileNotFoundError:
            # GCS answers 404 for a missing object (S3 does not), and the
            # client abandons a batch at its first error: the others may be
            # left (measured: none deleted). One at a time, a missing one
            # counting as deleted.
            if len(keys) > 1:
                for key in keys:
                    self._delete_key(key)
        except obx.BaseError as e:
            raise io_error("deleting", self.location, e) from None

    def _delete_key(self, key: str) -> None:
        try:
            obstore.delete(self.client, key)
        except FileNotFoundError:
            pass
        except obx.BaseError as e:
            raise io_error("deleting", self.location, e) from None

    def _orphans(self) -> list[str]:
        committed = {e["name"] for e in self._committed()}
        return sorted(
            n for n in self._list_names()
            if CHECKPOINT_RE.match(n) and n not in committed
        )

    def list_temp_files(self) -> list[str]:
        return [self.url_of(n) for n in self._orphans()]

    def remove_temp_files(self) -> list[str]:
        """Deletes checkpoint objects that no commit record names.

        They are uploads of a writer killed between its data object and its
        commit record. A multipart upload killed before completion leaves
        no object, only parts that the store keeps until aborted: a
        lifecycle rule removes them (see docs/remote-storage.md); a failed
        upload in a live process is aborted by the client.
        """
        orphans = self._orphans()
        self._delete(orphans)
        if orphans:
            log.info("removed %d uncommitted checkpoint object(s) left by an "
                     "interrupted upload in %s", len(orphans), self.location)
        return [self.url_of(n) for n in orphans]

    def exists(self) -> bool:
        try:
            for chunk in obstore.list(self.client, self.prefix, chunk_size=1):
                if chunk:
                    return True
        except obx.BaseError as e:
            raise io_error("listing", self.location, e) from None
        return False

    def remove_all(self) -> None:
        """Deletes every object under the prefix but a held lease.

        The commit record goes first, so that an interruption here leaves
        no checkpoint that looks committed; the lease goes with the lock.
        """
        names = self._list_names()
        self._delete([COMMIT_RECORD] if COMMIT_RECORD in names else [])
        held = self._held_lease() is not None
        self._delete([
            n for n in names
            if n != COMMIT_RECORD and not (n == LEASE_NAME and held)
        ])

    def open_checkpoint(self, location: str) -> CheckpointReader:
        """Downloads one checkpoint with parallel ranged reads, then opens it.

        A checkpoint is read whole: restoring it needs every byte (a
        manifest is small), and the requests go out at once, with no round
        trip for the header first. Its bytes stay in the client's buffers,
        never on the local disk (`format.RangedCheckpointReader`).
        """
        return self._open(self._name_of_url(location), location, whole=True)

    def _open(self, name: str, location: str,
              whole: bool = False) -> CheckpointReader:
        key = self._key(name)
        tail: tuple[int, Any] | None = None
        try:
            # The size the record gives: a different object under that
            # name fails the reader's checks. A part is not in the record:
            # the read of its end (footer, header) says its size, in the
            # request the reader would send first anyway (a HEAD would
            # cost a round trip, and fake-gcs-server answers 0 to one).
            size = next((int(e["size"]) for e in self._record or []
                         if e["name"] == name), None)
            if size is None:
                got = obstore.get(self.client, key,
                                  options={"range": {"suffix": TAIL_BYTES}})
                size = int(got.meta["size"])
                tail = (int(got.range[0]), got.bytes())
        except FileNotFoundError:
            raise  # pruned by a running training
        except obx.BaseError as e:
            raise io_error(f"reading {name}", location, e) from None
        return RangedCheckpointReader(
            location, _ObjectRanges(self.client, key, location, size, tail),
            whole=whole,
        )

    def write_object(self, name: str, data: bytes) -> None:
        check_object_name(name)
        if name in _RESERVED:
            raise ValueError(
                f"Invalid object name: {name!r} is reserved by the object "
                f"store. Received: name={name!r}"
            )
        self._put_small(name, bytes(data))

    def read_object(self, name: str) -> bytes | None:
        check_object_name(name)
        return self._get_small(name)

    def write_part(self, name: str, step: int, encoded: EncodedCheckpoint,
                   sync: bool, cancel: threading.Event | None = None,
                   direct: bool = False) -> CommitResult:
        start = time.perf_counter()
        size = self._upload(check_part_name(name), encoded, cancel)
        return CommitResult(self.url_of(name), step, size,
                            time.perf_counter() - start)

    def open_part(self, name: str) -> CheckpointReader:
        """Opens a part: its prefix, footer and header only; restore then
        reads only the byte ranges of the shards this process holds."""
        return self._open(check_part_name(name), self.url_of(name))

    def list_parts(self) -> list[str]:
        return sorted(n for n in self._list_names() if PART_RE.match(n))

    def remove_parts(self, names: list[str]) -> None:
        self._delete([check_part_name(n) for n in names])

    # Lock -------------------------------------------------------------------

    def _held_lease(self) -> Lease | None:
        hold = locks.held(self.location)
        return hold.handle if hold is not None else None

    def acquire_lock(self, owner: Any, flush: Callable[[], None]) -> None:
        """Takes the backup's lease for `owner` (see the module docstring).

        Inside one process the rules of `stores.locks` apply: a callback
        takes the lock over from another one only when that one cannot be
        training concurrently (collected, or its last `fit` ran on this
        same thread). A lease this process lost is replaced.

        Another job's lease is taken over at once when it has expired, or
        when it names a process of this host (same boot, same pid
        namespace) that no longer runs; a holder this host cannot check is
        waited for, up to `lease_wait_seconds`, until its lease lapses.

        Raises:
            BackupDirLockedError: another job holds the lease and is alive:
                a running process of this host, or a holder that renewed its
                lease during the wait (or whose lease is valid longer than
                the wait); or a callback training on another thread of this
                process holds it.
            OSError: the store cannot be reached.
        """
        def take() -> Lease:
            lease = Lease(self, self._key(LEASE_NAME))
            lease.acquire()
            # Another job may have committed since this process last looked.
            self._record = None
            return lease

        locks.acquire(
            self.location, owner, flush, self.location,
            valid=lambda lease: not lease.lost,
            discard=lambda lease: lease.release(),
            take=take,
        )

    def release_lock(self, owner: Any) -> None:
        lease = locks.release(self.location, owner)
        if lease is not None:
            lease.release()
