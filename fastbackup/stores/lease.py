"""The lease that locks a backup in an object store, held by one process.

A bucket has no `flock`: the lock is an object, `LEASE`, created with a
conditional PUT (`If-None-Match: *` on S3, `ifGenerationMatch=0` on GCS) so
that of two jobs one wins, and renewed by a background thread with
conditional updates on its ETag/generation. It names the process that holds
it (below), so that a job restarted on the same machine takes a dead
holder's lease over at once; a holder this process cannot check is waited
for until its lease lapses (`lease_wait_seconds`), and refused if it renews.
`object_store.ObjectStore.acquire_lock` takes one through `stores.locks`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Protocol

import obstore
from obstore import exceptions as obx

from fastbackup.errors import BackupDirLockedError
from fastbackup.stores.base import io_error

log = logging.getLogger("fastbackup")

# A lease is renewed this many times per lifetime, so that one or two failed
# renewals (a network blip) do not lose it.
_RENEWALS_PER_LEASE = 4


class LeasedLocation(Protocol):
    """What a lease needs of the store whose backup it locks."""

    client: Any
    location: str
    lease_seconds: float
    lease_wait_seconds: float

    def url_of(self, name: str) -> str: ...


# Process identity ------------------------------------------------------------
#
# A lease names the process that holds it, so that a job restarted on the
# same machine can tell at once whether the holder still runs: a pid alone
# is not enough (pids are reused), nor on another machine with the same
# hostname (containers with the host's network), nor in another pid
# namespace (a pid there means another process). The identity is the
# kernel's boot id (new at every boot), the pid namespace, the pid and the
# pid's start time since boot: equal boot id and namespace make the pid
# comparable; equal start time makes it the same process.


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None  # not Linux, or /proc not mounted: identity unknown


def proc_stat(pid: int) -> tuple[str, str] | None:
    """State and start time (clock ticks since boot) of `pid`, from
    `/proc/<pid>/stat` (fields 3 and 22), or `None` if unreadable."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: the
    # fields that follow start after its last ")".
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20:
        return None
    return fields[0], fields[19]


def this_process() -> dict[str, Any]:
    """What a lease records of its holder (see above)."""
    pid = os.getpid()
    stat = proc_stat(pid)
    try:
        pidns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    return {
        "host": socket.gethostname(),
        "boot": _read_text("/proc/sys/kernel/random/boot_id"),
        "pidns": pidns,
        "pid": pid,
        "start": stat[1] if stat is not None else None,
    }


def holder_is_running(info: dict[str, Any]) -> bool | None:
    """Whether the process a lease names runs: `None` when this process
    cannot tell (another machine, pid namespace or system)."""
    me = this_process()
    pid = info.get("pid")
    if (not isinstance(pid, int) or pid <= 0 or info.get("start") is None
            or any(me[k] is None or info.get(k) != me[k]
                   for k in ("host", "boot", "pidns"))):
        return None
    try:
        os.kill(pid, 0)  # unlike /proc, not hidden by `hidepid`
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = proc_stat(pid)
    if stat is None:
        # It exists, but its start time is hidden (`hidepid`): exited just
        # now, or another user's. Not known: the lease is waited for.
        return None
    state, start = stat
    # A zombie (Z) or dead (X) holder has exited, its parent has not yet
    # reaped it; another start time is another process with a reused pid.
    return state not in ("Z", "X") and start == str(info["start"])


class Lease:
    """The lease object of one backup, held and renewed by this process."""

    def __init__(self, store: LeasedLocation, key: str) -> None:
        self.store = store
        self.seconds = store.lease_seconds
        self.key = key
        self.url = store.url_of(key.rpartition("/")[2])
        self.owner = uuid.uuid4().hex
        self.identity = this_process()
        self.e_tag: str | None = None
        self.version: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({
            "owner": self.owner,
            **self.identity,
            "expires": time.time() + self.seconds,
            "seconds": self.seconds,
        }).encode()

    def _mode(self) -> dict[str, str]:
        mode = {"e_tag": self.e_tag or ""}
        if self.version is not None:
            mode["version"] = self.version
        return mode

    def _took(self, result: Any) -> None:
        self.e_tag = result.get("e_tag")
        self.version = result.get("version")

    def acquire(self) -> None:
        client = self.store.client
        try:
            self._took(obstore.put(client, self.key, self._body(), mode="create"))
        except (obx.AlreadyExistsError, obx.PreconditionError):
            self._take_over()
        except FileNotFoundError as e:
            # A create needs no object: it is the bucket that is missing.
            raise io_error("creating the lease (does the bucket exist?)",
                            self.url, e) from None
        except obx.BaseError as e:
            raise io_error("creating the lease", self.url, e) from None
        self._thread = threading.Thread(
            target=self._renew_loop, name="fastbackup-lease", daemon=True
        )
        self._thread.start()

    def _create_again(self) -> None:
        """The lease was released while this process looked at it: one more
        create, which another job may win."""
        try:
            self._took(obstore.put(self.store.client, self.key, self._body(),
                                   mode="create"))
        except (obx.AlreadyExistsError, obx.PreconditionError):
            raise self._locked({}) from None
        except obx.BaseError as e:
            raise io_error("creating the lease", self.url, e) from None

    def _read(self) -> tuple[Any, dict[str, Any]] | None:
        """The lease's metadata and body (`{}` if unreadable), or `None`
        if there is none."""
        try:
            got = obstore.get(self.store.client, self.key)
            meta, data = got.meta, bytes(got.bytes())
        except FileNotFoundError:
            return None
        except obx.BaseError as e:
            raise io_error("reading the lease", self.url, e) from None
        try:
            info = json.loads(data)
            float(info["expires"])
        except (ValueError, KeyError, TypeError):
            info = {}  # unreadable: treated as expired
        return meta, info

    def _take_over(self) -> None:
        """After a failed create: takes over the lease of a job that is not
        running any more (see `acquire_lock`), or raises."""
        read = self._read()
        if read is None:
            self._create_again()
            return
        meta, info = read
        if info.get("owner") == self.owner:
            # Our own create, retried by the client after a lost reply.
            self._took(meta)
            return
        expires = float(info.get("expires", 0.0))
        if time.time() >= expires:
            self._replace(meta, info, f"its lease expired "
                          f"{time.time() - expires:.0f} s ago")
            return
        running = holder_is_running(info)
        if running:
            raise self._locked(info)
        if running is False:
            self._replace(meta, info, "its process on this host is gone")
            return
        # Another host (or pid namespace): only the lease itself can tell
        # whether its holder lives. A live holder renews it within a
        # quarter of its lifetime; a dead one lets it lapse.
        wait = self.store.lease_wait_seconds
        if expires - time.time() > wait:
            raise self._locked(info, f"; waiting for it to lapse would take "
                               f"longer than FASTBACKUP_LEASE_WAIT_SECONDS="
                               f"{wait:g}")
        log.warning(
            "backup_dir %s is locked by host %s, pid %s, which this host "
            "cannot check: waiting until %s (%.0f s) for its lease to lapse, "
            "then taking it over; if the holder renews it meanwhile, it is a "
            "live job and this one stops", self.store.location,
            info.get("host", "?"), info.get("pid", "?"),
            time.strftime("%H:%M:%S", time.localtime(expires)),
            expires - time.time())
        if self._wait_for_lapse(meta, info, expires):
            self._replace(meta, info, "its lease lapsed while this job waited")

    def _wait_for_lapse(self, meta: dict[str, Any], info: dict[str, Any],
                        expires: float) -> bool:
        """Waits until `expires` while the lease stays as read.

        Returns:
            True once it has lapsed unchanged; False if it was released
            meanwhile and this process created it.

        Raises:
            BackupDirLockedError: it was renewed (or taken) meanwhile.
        """
        # Polled with HEADs several times per renewal period of the holder,
        # so that a live holder is recognised soon after its next renewal.
        try:
            holder_seconds = float(info.get("seconds") or self.seconds)
        except (TypeError, ValueError):
            holder_seconds = self.seconds
        period = min(1.0, max(0.05, holder_seconds / 16))
        while True:
            left = expires - time.time()
            if left <= 0:
                return True
            time.sleep(min(period, left))
            try:
                now = obstore.head(self.store.client, self.key)
            except FileNotFoundError:
                self._create_again()
                return False
            except obx.BaseError as e:
                raise io_error("reading the lease", self.url, e) from None
            if (now.get("e_tag"), now.get("version")) != (
                    meta.get("e_tag"), meta.get("version")):
                read = self._read()
                raise self._locked(read[1] if read is not None else {},
                                   "; it was renewed (or taken over) while this "
                                   "job waited")

    def _replace(self, meta: dict[str, Any], info: dict[str, Any],
                 why: str) -> None:
        """Takes the lease over with a conditional update on the version
        read, so that of two jobs taking it over only one succeeds."""
        mode: Any = {"e_tag": meta.get("e_tag") or ""}
        if meta.get("version") is not None:
            mode["version"] = meta["version"]
        try:
            self._took(obstore.put(self.store.client, self.key, self._body(),
                                   mode=mode))
        except (obx.PreconditionError, obx.AlreadyExistsError):
            # Renewed by its holder, or taken over by another job first.
            raise self._locked({}) from None
        except FileNotFoundError:
            self._create_again()
            return
        except obx.BaseError as e:
            raise io_error("taking over the lease", self.url, e) from None
        log.warning("took over the lease of %s held by host %s, pid %s: %s",
                    self.store.location, info.get("host", "?"),
                    info.get("pid", "?"), why)

    def _locked(self, info: dict[str, Any], why: str = "") -> BackupDirLockedError:
        who = (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
               f"lease valid {max(0.0, float(info.get('expires', 0)) - time.time()):.0f} s more"
               if info else "another job")
        return BackupDirLockedError(
            errno.EBUSY,
            f"backup_dir is locked by another job ({who}{why}); two trainings "
            "must not share one backup_dir. A killed job's lease is taken "
            "over at once on its own host, and from another host once it "
            "lapses, at most FASTBACKUP_LEASE_SECONDS after its last renewal",
            self.store.location,
        )

    def _renew_loop(self) -> None:
        period = self.seconds / _RENEWALS_PER_LEASE
        valid_until = time.monotonic() + self.seconds
        while not self._stop.wait(period):
            try:
                self._took(obstore.put(self.store.client, self.key,
                                       self._body(), mode=self._mode()))
                valid_until = time.monotonic() + self.seconds
            except (obx.PreconditionError, FileNotFoundError):
                if self._still_ours():
                    continue
                self._lose("another job took it over")
                return
            except obx.BaseError as e:
                if time.monotonic() >= valid_until:
                    self._lose(f"it could not be renewed in time: {e}")
                    return
                log.warning("fastbackup: renewing the lease of %s failed, "
                            "retrying: %s", self.store.location, e)

    def _still_ours(self) -> bool:
        """After a failed conditional renewal: a renewal that succeeded but
        whose reply was lost, then retried by the client, fails its
        precondition against our own new ETag. Adopts it if so."""
        try:
            got = obstore.get(self.store.client, self.key)
            info = json.loads(bytes(got.bytes()))
        except (obx.BaseError, ValueError):
            return False
        if info.get("owner") != self.owner:
            return False
        self._took(got.meta)
        return True

    def _lose(self, why: str) -> None:
        self.lost = True
        log.error("fastbackup: lost the lease of %s (%s); checkpoints are no "
                  "longer committed", self.store.location, why)

    def check(self) -> None:
        """Raises if the lease was lost: committing could overwrite a new job."""
        if self.lost:
            raise BackupDirLockedError(
                errno.EBUSY,
                "the lease on backup_dir was lost (not renewed in time, or "
                "taken over by another job); this checkpoint is not committed",
                self.store.location,
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.seconds)
        if self.lost:
            return
        try:
            got = obstore.get(self.store.client, self.key)
            info = json.loads(bytes(got.bytes()))
            if info.get("owner") == self.owner:
                obstore.delete(self.store.client, self.key)
        except FileNotFoundError:
            pass
        except (obx.BaseError, ValueError) as e:
            log.warning("fastbackup: could not release the lease of %s (it "
                        "expires in %g s): %s", self.store.location,
                        self.seconds, e)
